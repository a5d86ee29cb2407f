"""Task configurations for lm-evaluation-harness that read the original public file formats (see loaders.py)."""

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent
