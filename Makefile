# Two entry points on a fresh machine: `make demo` and `make test`. Both create .venv and install what they need.
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= local,qlora,distributed,server,azure,kaito,onnx,mlflow,tensorboard,plot,dev,docs

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: the CPU wheel on this machine's disk (a bare `torch` could pull a multi-GB CUDA build)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[$(EXTRAS)]'
	touch $@

.PHONY: install demo test lint docs
install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/phitune demo

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests benchmarks samples tools
	$(VENV)/bin/ruff format --check src tests benchmarks samples tools
	$(VENV)/bin/mypy
	# the documentation site: a broken link or anchor, or a docstring griffe cannot parse, fails the build
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet --site-dir site

docs: $(VENV)/.installed
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs serve

test: lint
	$(PY) -m pytest -q
