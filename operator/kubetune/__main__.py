"""`python -m kubetune` is `kubetune operator` (what the operator image runs)."""

import sys

from kubetune.cli.main import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or ["operator"]))
