# Everything installs into .venv; `make test` and `make demo` work on a fresh clone.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO_STAMP := $(VENV)/.installed-demo
# `make demo GENERATION=3v`: the demo on minimind-3v's network (scripts/demo.py --generation)
GENERATION ?= v1

.PHONY: install test demo web clean

# `make demo` installs only what the demo needs (requirements-demo.txt); `make test` and the apps add the rest.
# scripts/install_venv.py: uv where it installs (configured from pip's settings), else pip.
$(DEMO_STAMP): requirements-demo.txt
	$(PYTHON) scripts/install_venv.py --venv $(VENV) -r requirements-demo.txt
	touch $(DEMO_STAMP)

$(STAMP): requirements.txt $(DEMO_STAMP)
	$(PYTHON) scripts/install_venv.py --venv $(VENV) -r requirements.txt
	touch $(STAMP)

install: $(STAMP)

test: install
	$(PY) -m pytest -q tests

demo: $(DEMO_STAMP)
	$(PY) scripts/demo.py --generation $(GENERATION)

web: install
	$(PY) -m streamlit run web_server.py --server.address 127.0.0.1

clean:
	rm -rf $(VENV) dataset/demo
	find out -mindepth 1 -not -name README.md -exec rm -rf {} +
