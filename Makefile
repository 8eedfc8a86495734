# DermFed: `make demo` runs the main job on the embedded synthetic data; `make test` runs the tests.
# Both create the virtual environment on first use.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Pinned so that a fresh setup takes the torch build already on this kind of machine instead of
# downloading another multi-GB one. Elsewhere, e.g. on a CUDA machine: make TORCH_SPEC="torch torchvision"
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
DEMO_DATA ?= data/synthetic

.PHONY: demo test install clean

$(BIN)/dermfed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install $(TORCH_SPEC)
	$(BIN)/pip install -e ".[dev]"
	touch $@

install: $(BIN)/dermfed

DEMO_RUN ?= runs/demo

demo: $(BIN)/dermfed
	rm -rf $(DEMO_RUN)/data-summary $(DEMO_RUN)/study  # the demo's own runs: made anew
	$(BIN)/dermfed data synth --config demo --out $(DEMO_DATA)
	$(BIN)/dermfed data summary --config demo data.root=$(DEMO_DATA) --out $(DEMO_RUN)/data-summary
	$(BIN)/dermfed study --config demo data.root=$(DEMO_DATA) --out $(DEMO_RUN)/study
	@echo "federated checkpoint: $(DEMO_RUN)/study/federated-vae/checkpoint.pt; history: $(DEMO_RUN)/study/federated-vae/history.csv"
	@echo "study steps and commands: $(DEMO_RUN)/study/study.json"
	@echo "report (open in a browser): $(CURDIR)/$(DEMO_RUN)/study/evaluation/report.html"

test: $(BIN)/dermfed
	$(BIN)/python -m pytest

clean:
	rm -rf runs .cache data/synthetic data/smoke
