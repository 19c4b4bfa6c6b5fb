"""`python -m kubetune_trainer --config job.json` — alone, or under torchrun.

Exit status: 0 done (or already done), 1 the job failed (the message says why),
2 usage or configuration error, 143 stopped by SIGTERM after writing a checkpoint
(a restart resumes from it).
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

from kubetune.planning.resolved import ResolvedJob
from kubetune_trainer.backends import backend_for
from kubetune_trainer.checkpoint import EXIT_PREEMPTED, Preempted
from kubetune_trainer.config import ConfigError, RunOptions, load_job
from kubetune_trainer.data import DataError
from kubetune_trainer.host_memory import reuse_freed_memory
from kubetune_trainer.models import ModelError

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2


def run_job(job: ResolvedJob, options: RunOptions) -> Path:
    """Run a resolved job in this process (one rank of it under torchrun)."""
    reuse_freed_memory()
    return backend_for(job.backend).run(job, options)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m kubetune_trainer", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="the resolved job (JSON), e.g. /etc/kubetune/job.json")
    parser.add_argument("--progress-file", help="append progress events as JSON lines to this file")
    parser.add_argument("--no-progress-bar", action="store_true", help="do not draw a progress bar")
    parser.add_argument("--checkpoint-every", type=int, help="optimizer steps between checkpoints")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    rank = os.environ.get("RANK", "0")
    prefix = "kubetune-trainer" + (f"[rank {rank}]" if os.environ.get("WORLD_SIZE", "1") != "1" else "")
    try:
        job = load_job(args.config)
        options = RunOptions.from_environment(
            progress_bar=False if args.no_progress_bar else None,
            progress_file=args.progress_file,
            checkpoint_every=args.checkpoint_every,
        )
        folder = run_job(job, options)
    except ConfigError as error:
        print(f"{prefix}: error: {error}", file=sys.stderr)
        return EXIT_CONFIG
    except (DataError, ModelError) as error:
        print(f"{prefix}: error: {error}", file=sys.stderr)
        return EXIT_FAILED
    except Preempted as error:
        print(f"{prefix}: {error}", file=sys.stderr)
        return EXIT_PREEMPTED
    except Exception:
        traceback.print_exc()
        return EXIT_FAILED
    if rank == "0":
        print(f"{prefix}: result: {folder}", file=sys.stderr)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
