"""Train the captioner with Accelerate: `accelerate launch train_accelerate.py ...` (work in progress)."""

from __future__ import annotations

from pathlib import Path

# Where the offline demo (`--demo`) writes its model; the Space falls back to it when MODEL_ID is unset.
DEMO_OUTPUT_DIR = Path(__file__).resolve().parent / "outputs" / "demo"
