# The two commands: `make run` (the main job) and `make test` (the whole suite).
# Both set everything up themselves on a fresh Debian machine.

PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed-requirements

.PHONY: run test bench demo lint clean system-packages venv

run: system-packages venv
	$(VENV)/bin/python app.py db upgrade
	$(VENV)/bin/python app.py serve

demo: system-packages venv
	$(VENV)/bin/python app.py demo

test: system-packages venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/python -m pytest

bench: system-packages venv
	$(VENV)/bin/python -m bench.run

lint: venv
	$(VENV)/bin/ruff check .

system-packages:
	@scripts/system-packages.sh

venv: $(STAMP)

# pyscard compiles against libpcsclite-dev, so system packages come first.
$(STAMP): requirements.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -r requirements.txt
	touch $(STAMP)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis instance
