"""Shared by every test folder: puts ``tests/`` on the import path for helper modules such as ``checkpoint_damage``."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
