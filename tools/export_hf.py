#!/usr/bin/env python
"""Export a kd student checkpoint (DeepSpeed, ZeRO 0-3) as a Hugging Face model directory.

    python tools/export_hf.py RUN_DIR/checkpoints OUT_DIR [--tag TAG] [--dtype fp32|bf16] [--overwrite]

Thin wrapper over `kd.export` (the same code as `kd export`). Bad input: one line on stderr, exit code 2.
"""
from __future__ import annotations

import sys
from pathlib import Path

# Let the script run from a source checkout without installing kd.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kd.export import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
