# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install clean

# torch==2.13.0 goes in first: here it resolves to the local CPU wheel, and with it present nothing
# that depends on torch can pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m dqt_lightning fit --config configs/ternary.yaml

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs
