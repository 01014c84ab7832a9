# Everything runs from a virtual environment in .venv, made on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install test clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[convert,test]'
	touch $@

## install: the runtime, the converter (TensorFlow) and the test tools, into .venv
install: $(STAMP)

## test: the whole test suite
test: install
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) build dist *.egg-info runtime/*.egg-info converter/*.egg-info .pytest_cache .hypothesis
