"""`kubetune operator` under yappi (every thread: kopf's event loop and its handler threads).

`bench/operator_launch.py --profile OUT` starts the operator through this file and sends it
SIGUSR1 when the bursts are done: the profile so far is written as pstats to OUT (read it
with `python -m pstats OUT`) and the top functions are printed into the operator's log.
With `--memory` (the bench's `--profile-memory`), tracemalloc's live allocations instead.
"""

from __future__ import annotations

import io
import os
import pstats
import signal
import sys
import threading
import tracemalloc

import yappi

from kubetune.handlers.operator import run


def dump_memory(out: str) -> None:
    """The live Python allocations, by the line that made them (`--profile-memory`)."""
    snapshot = tracemalloc.take_snapshot()
    lines = [str(stat) for stat in snapshot.statistics("lineno")[:40]]
    lines += ["", "by traceback:"]
    for stat in snapshot.statistics("traceback")[:8]:
        lines += [str(stat), *stat.traceback.format(limit=12)]
    text = "\n".join(lines)
    print(text, flush=True)
    partial = f"{out}.partial"
    with open(partial, "w", encoding="utf-8") as file:
        file.write(text)
    os.replace(partial, out)


def dump(out: str) -> None:
    yappi.stop()
    partial = f"{out}.partial"
    yappi.get_func_stats().save(partial, type="pstat")
    text = io.StringIO()
    pstats.Stats(partial, stream=text).sort_stats("tottime").print_stats(40)
    pstats.Stats(partial, stream=text).sort_stats("cumulative").print_stats(60)
    print(text.getvalue(), flush=True)
    os.replace(partial, out)  # appears whole: the bench waits for it


def main() -> int:
    out, memory = sys.argv[1], sys.argv[2:] == ["--memory"]
    # A handler thread, not kopf's event loop: kopf owns SIGTERM/SIGINT, never SIGUSR1.
    target = dump_memory if memory else dump
    signal.signal(signal.SIGUSR1, lambda *_: threading.Thread(target=target, args=(out,)).start())
    if memory:
        tracemalloc.start(12)
    else:
        yappi.set_clock_type("cpu")  # where the CPU goes; the 2-core machine is CPU-bound under a burst
        yappi.start(builtins=False)
    run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
