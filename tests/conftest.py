"""pytest set-up shared by every test file.

The tests mirror the package: ``core/`` the torch-only math, config and vocabulary rule; ``verl/`` the
plugin's verl glue (loss adapter, teachers, checks, trainer, fence) called directly; ``e2e/`` runs of
verl's real trainer; ``tools/`` the tiny pair, CPU runtime, demo, comparison, diagnostic, benchmarks, data
preparation and recipes; ``helpers/`` shared fixtures and the bodies of multi-process ranks.
"""

import json
import sys
from pathlib import Path

import pytest

# --import-mode=importlib (pyproject) keeps verl's installed top-level `tests` package out of the way; the
# helper modules are then imported by path.
sys.path.insert(0, str(Path(__file__).resolve().parent / "helpers"))


@pytest.fixture(scope="session")
def real_tokenizer_folders(tmp_path_factory) -> dict[str, Path]:
    """The paper's three tokenizer families, built offline once per session (`ta_opd_verl.shapes.tokenizers`),
    each in a folder with the minimal config.json of its models: ``model_type`` (which picks the tokenizer
    class) and ``vocab_size`` (the published embedding rows)."""
    from ta_opd_verl.shapes import tokenizers

    embedding_rows = {"qwen3": 151_936, "qwen2.5-instruct": 151_936, "deepseek-r1-distill-qwen": 152_064}
    root = tmp_path_factory.mktemp("real-tokenizers")
    folders = {}
    for name, rows in embedding_rows.items():
        folder = tokenizers.write_tokenizer(name, root / name)
        config = {"model_type": tokenizers.family(name).config_model_type, "vocab_size": rows}
        (folder / "config.json").write_text(json.dumps(config))
        folders[name] = folder
    return folders
