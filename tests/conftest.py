"""pytest set-up shared by every test file."""

import sys
from pathlib import Path

# --import-mode=importlib (pyproject) keeps verl's installed top-level `tests` package out of the way; the
# helper modules beside this file are then imported by path.
sys.path.insert(0, str(Path(__file__).resolve().parent))
