"""Child processes of the e2e control plane: start, health-wait, stop, log tails.

Every process runs in its own session (process group), with stdout+stderr in
``<workdir>/<name>.log``. Stopping sends SIGTERM to the whole group, then SIGKILL after
a grace period. Three safety nets make sure nothing outlives the test run: the
context manager's ``finally``, an ``atexit`` hook, and a parent-death signal (Linux
``setpriv --pdeathsig``), which kills a child when the Python process that started it
dies, even by SIGKILL.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, suppress
from http import HTTPStatus
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
STOP_GRACE_S = 15.0
LOG_TAIL_LINES = 40
_LIVE: set[Process] = set()


class ControlPlaneError(RuntimeError):
    """The control plane could not be built, started or used; the message says why."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _pdeathsig_prefix() -> list[str]:
    """``setpriv --pdeathsig KILL --`` (util-linux): the child gets SIGKILL when the thread
    that started it dies, even by SIGKILL. Only from the main thread (a worker thread may
    end long before the test run) and only where setpriv exists. A launcher instead of
    ``preexec_fn``, which is unsafe when the test process has threads."""
    setpriv = shutil.which("setpriv")
    if setpriv is None or threading.current_thread() is not threading.main_thread():
        return []
    return [setpriv, "--pdeathsig", "KILL", "--"]


class Process:
    """One control-plane process and its log file."""

    def __init__(self, name: str, popen: subprocess.Popen[bytes], log: Path) -> None:
        self.name = name
        self.popen = popen
        self.log = log

    @classmethod
    @contextmanager
    def start(cls, name: str, argv: Sequence[str], workdir: Path) -> Iterator[Process]:
        """Start ``argv``; always stop it (and its process group) when the block exits."""
        log = workdir / f"{name}.log"
        with log.open("ab") as out:
            try:
                popen = subprocess.Popen(
                    [*_pdeathsig_prefix(), *argv],
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    cwd=workdir,
                    start_new_session=True,
                )
            except OSError as exc:
                raise ControlPlaneError(f"cannot start {name} ({argv[0]}): {exc}") from exc
        proc = cls(name, popen, log)
        _LIVE.add(proc)
        try:
            yield proc
        finally:
            proc.stop()

    def alive(self) -> bool:
        return self.popen.poll() is None

    def check_alive(self) -> None:
        if not self.alive():
            raise ControlPlaneError(f"{self.name} exited with code {self.popen.returncode} (log: {self.log})")

    def stop(self) -> None:
        """SIGTERM the process group, SIGKILL after STOP_GRACE_S; idempotent."""
        _LIVE.discard(self)
        pgid = self.popen.pid  # a session leader's pgid is its pid
        if self.alive():
            _killpg(pgid, signal.SIGTERM)
            with suppress(subprocess.TimeoutExpired):
                self.popen.wait(STOP_GRACE_S)
        _killpg(pgid, signal.SIGKILL)  # also any leftover children of the group
        with suppress(subprocess.TimeoutExpired):
            self.popen.wait(STOP_GRACE_S)


def _killpg(pgid: int, sig: signal.Signals) -> None:
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


@atexit.register
def _stop_leftovers() -> None:
    for proc in list(_LIVE):
        proc.stop()


def wait_http(
    url: str,
    procs: Sequence[Process],
    timeout_s: float,
    *,
    ca: Path | None = None,
    token: str | None = None,
) -> None:
    """Poll ``url`` until it answers 200. HTTPS is verified against ``ca``; ``ca=None`` on an
    https URL skips verification (self-signed health endpoints). Fails early if one of
    ``procs`` exits."""
    ctx: ssl.SSLContext | None = None
    if url.startswith("https:"):
        if ca is not None:
            ctx = ssl.create_default_context(cafile=str(ca))
        else:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    deadline = time.monotonic() + timeout_s
    last = "no answer yet"
    while True:
        for p in procs:
            p.check_alive()
        try:
            req = urllib.request.Request(url, headers=headers)
            with urllib.request.urlopen(req, context=ctx, timeout=5) as resp:
                if resp.status == HTTPStatus.OK:
                    return
                last = f"HTTP {resp.status}"
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code}: {exc.read()[:300]!r}"
        except (OSError, ssl.SSLError) as exc:
            last = repr(exc)
        if time.monotonic() > deadline:
            raise ControlPlaneError(f"{url} not ready after {timeout_s:.0f} s ({last})")
        time.sleep(0.25)


def log_tails(workdir: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of every ``*.log`` in ``workdir``, for failure messages."""
    parts = []
    for log in sorted(workdir.glob("*.log")):
        try:
            text = log.read_text(errors="replace").splitlines()[-lines:]
        except OSError as exc:
            parts.append(f"--- {log}: {exc}")
            continue
        parts.append(f"--- last {len(text)} lines of {log}:\n" + "\n".join(text))
    return "\n".join(parts) or f"(no logs in {workdir})"


def serve_until_interrupted(session: AbstractContextManager[T], announce: Callable[[T], None]) -> int:
    """Enter ``session`` (a running control plane or cluster), ``announce`` it, and wait
    for Ctrl-C; exit status 1 with the error when it does not start.

    Ctrl-C even where SIGINT came in ignored (a background job); SIGTERM/SIGHUP end it
    normally. Either way the session's finally blocks stop every process.
    """
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda *_: sys.exit(0))
    try:
        with session as value:
            announce(value)
            print("Ctrl-C stops it.", flush=True)
            signal.pause()
    except ControlPlaneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nstopped", file=sys.stderr)
    return 0
