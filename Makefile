# Everything installs into .venv; `make test` and `make demo` work on a fresh clone.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# `make demo GENERATION=3v`: the demo on minimind-3v's network (scripts/demo.py --generation)
GENERATION ?= v1

.PHONY: install test demo web clean

$(STAMP): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $(STAMP)

install: $(STAMP)

test: install
	$(PY) -m pytest -q tests

demo: install
	$(PY) scripts/demo.py --generation $(GENERATION)

web: install
	$(PY) -m streamlit run web_server.py --server.address 127.0.0.1

clean:
	rm -rf $(VENV) dataset/demo
	find out -mindepth 1 -not -name README.md -exec rm -rf {} +
