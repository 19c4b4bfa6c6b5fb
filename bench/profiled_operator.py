"""`kubetune operator` under yappi (every thread: kopf's event loop and its handler threads).

`bench/operator_launch.py --profile OUT` starts the operator through this file; on SIGTERM
kopf stops, and the profile is written as pstats to OUT (read it with `python -m pstats OUT`)
and the top functions by own time are printed into the operator's log.
"""

from __future__ import annotations

import io
import pstats
import sys

import yappi

from kubetune.handlers.operator import run


def main() -> int:
    out = sys.argv[1]
    yappi.set_clock_type("cpu")  # where the CPU goes; the 2-core machine is CPU-bound under a burst
    yappi.start(builtins=False)
    try:
        run()
    finally:
        yappi.stop()
        stats = yappi.get_func_stats()
        stats.save(out, type="pstat")
        text = io.StringIO()
        pstats.Stats(out, stream=text).sort_stats("tottime").print_stats(40)
        pstats.Stats(out, stream=text).sort_stats("cumulative").print_stats(60)
        print(text.getvalue(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
