PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_PIN := torch==2.13.0

.PHONY: venv test demo bench lint clean

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

lint: venv
	$(BIN)/python -m ruff check .

clean:
	rm -rf $(VENV) build *.egg-info
