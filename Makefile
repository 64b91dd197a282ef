# Quick start: `make run` (default reconstruction of the shipped sample), `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python

.PHONY: install run test label clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

run: install
	$(PY) -m monai.bundle run --config_file configs/inference.json

test: install
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) outputs runs eval cache

# The MONAI Label server lives in its own virtual environment (.venv-label) so that its
# pins (numpy<2, pydicom<3, ...) cannot break the main one; see docs/monailabel.md.
label: install
	bash scripts/make_label_env.sh
