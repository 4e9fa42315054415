# Prune-then-distill pipeline. `make help` lists the targets.
PYTHON ?= .venv/bin/python
EXP ?= demo
ARGS ?=
RUNS ?= runs
SETUP_STAMP := .venv/.setup-done

.PHONY: help setup test test-slow demo import export bench

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | expand -t 14

setup: $(SETUP_STAMP)  ## create .venv with CPU torch, megatron-core, ModelOpt and the rest

$(SETUP_STAMP): requirements.txt pyproject.toml
	python3 -m venv .venv
	.venv/bin/pip install -q --upgrade pip
	.venv/bin/pip install -q torch==2.13.0
	.venv/bin/pip install -q -r requirements.txt
	.venv/bin/pip install -q --no-deps -e .
	touch $@

test: setup  ## run the default test tier (CPU, ~minutes)
	$(PYTHON) -m pytest -q -p no:cacheprovider

test-slow: setup  ## run the slow tier too
	$(PYTHON) -m pytest -q -p no:cacheprovider -m "slow or not slow"

demo: setup  ## tiny Llama on CPU: random HF model -> import -> export -> check it loads in transformers
	rm -rf $(RUNS)/demo
	$(PYTHON) scripts/random_hf.py model=tiny output=$(RUNS)/demo/random_hf $(ARGS)
	$(PYTHON) scripts/import_hf.py source=$(RUNS)/demo/random_hf output=$(RUNS)/demo/import
	$(PYTHON) scripts/export_hf.py source=$(RUNS)/demo/import output=$(RUNS)/demo/export
	$(PYTHON) -c "import transformers as t; m = t.AutoModelForCausalLM.from_pretrained('$(RUNS)/demo/export'); print('[demo] exported model loads in transformers:', type(m).__name__, sum(p.numel() for p in m.parameters()), 'parameters')"

import: setup  ## import a Hugging Face folder: make import ARGS="source=HF_DIR output=CKPT_DIR"
	$(PYTHON) scripts/import_hf.py $(ARGS)

export: setup  ## export a checkpoint: make export ARGS="source=CKPT_DIR output=HF_DIR"
	$(PYTHON) scripts/export_hf.py $(ARGS)

bench: setup  ## run the benchmarks (each prints its ratios on its last line)
	$(PYTHON) bench/import_memory.py
