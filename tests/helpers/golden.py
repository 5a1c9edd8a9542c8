"""The golden vectors of the authors' code: ``authors-code-vectors.npz`` in the shared reference folder
beside the clone (``../shared/reference``; its README lists every array and the rules 1-14 they pin)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

REFERENCE = Path(__file__).resolve().parents[3] / "shared" / "reference"
VECTORS = REFERENCE / "authors-code-vectors.npz"


def golden_vectors() -> dict[str, np.ndarray]:
    """Every array of the file by name; skips the calling test, naming the path, when the file is absent."""
    if not VECTORS.is_file():
        pytest.skip(f"the authors' golden vectors are not at {VECTORS} (the shared reference folder)")
    with np.load(VECTORS) as archive:
        return {name: archive[name] for name in archive.files}


def golden_case(vectors: dict[str, np.ndarray], index: int) -> dict[str, torch.Tensor]:
    """One case's numeric arrays as tensors, by name without the ``caseNN/`` prefix."""
    prefix = f"case{index:02d}/"
    return {
        name.removeprefix(prefix): torch.from_numpy(value)
        for name, value in vectors.items()
        if name.startswith(prefix) and value.dtype.kind != "U"
    }
