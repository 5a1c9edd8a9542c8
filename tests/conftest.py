"""pytest set-up shared by every test file.

The tests mirror the package: ``core/`` the torch-only math, config and vocabulary rule; ``verl/`` the
plugin's verl glue (loss adapter, teachers, checks, trainer, fence) called directly; ``e2e/`` runs of
verl's real trainer; ``tools/`` the tiny pair, CPU runtime, demo, comparison, diagnostic, benchmarks, data
preparation and recipes; ``helpers/`` shared fixtures and the bodies of multi-process ranks.
"""

import sys
from pathlib import Path

# --import-mode=importlib (pyproject) keeps verl's installed top-level `tests` package out of the way; the
# helper modules are then imported by path.
sys.path.insert(0, str(Path(__file__).resolve().parent / "helpers"))
