# Prune-then-distill pipeline. `make help` lists the targets.
PYTHON ?= .venv/bin/python
EXP ?= demo
ARGS ?=
RUNS ?= runs
SETUP_STAMP := .venv/.setup-done

.PHONY: help setup test test-slow demo prepare-data prune logits import export bench

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

test: setup  ## run the default test tier (CPU, about 1.5 min)
	$(PYTHON) -m pytest -q -p no:cacheprovider

test-slow: setup  ## run the slow tier too
	$(PYTHON) -m pytest -q -p no:cacheprovider -m "slow or not slow"

DEMO := $(RUNS)/demo
PRUNE_DEMO := data=austen prune.calib_samples=64 prune.eval_samples=32 prune.sequence_length=128

demo: setup  ## tiny Llama on CPU: Austen data -> import -> prune by depth and width -> export
	rm -rf $(DEMO)
	$(PYTHON) scripts/prepare_data.py data=austen
	$(PYTHON) scripts/random_hf.py model=tiny output=$(DEMO)/random_hf $(ARGS)
	cp data/austen/tokenizer/* $(DEMO)/random_hf/
	$(PYTHON) scripts/import_hf.py source=$(DEMO)/random_hf output=$(DEMO)/teacher
	$(PYTHON) scripts/prune.py prune=depth prune.source=$(DEMO)/teacher prune.output=$(DEMO)/pruned_depth prune.target_num_layers=2 $(PRUNE_DEMO)
	$(PYTHON) scripts/prune.py prune=width prune.source=$(DEMO)/teacher prune.output=$(DEMO)/pruned_width prune.target.hidden_size=48 prune.target.ffn_hidden_size=128 prune.target.num_attention_heads=2 $(PRUNE_DEMO) > $(DEMO)/prune_width.log
	tail -1 $(DEMO)/prune_width.log
	$(PYTHON) scripts/export_hf.py source=$(DEMO)/pruned_depth output=$(DEMO)/export_depth
	$(PYTHON) scripts/export_hf.py source=$(DEMO)/pruned_width output=$(DEMO)/export_width
	$(PYTHON) -c "import transformers as t; [print(f'[demo] {s}-pruned student exported to $(DEMO)/export_{s}: loads in transformers,', sum(p.numel() for p in t.AutoModelForCausalLM.from_pretrained('$(DEMO)/export_' + s).parameters()), 'parameters') for s in ('depth', 'width')]"

prepare-data: setup  ## tokenize a corpus: make prepare-data ARGS="data=austen"
	$(PYTHON) scripts/prepare_data.py $(ARGS)

logits: setup  ## cache teacher top-k soft labels: make logits ARGS="logits.teacher=CKPT logits.output=CACHE"
	$(PYTHON) scripts/teacher_logits.py $(ARGS)

prune: setup  ## prune a checkpoint: make prune ARGS="prune=depth prune.source=CKPT prune.output=OUT prune.target_num_layers=16"
	$(PYTHON) scripts/prune.py $(ARGS)

import: setup  ## import a Hugging Face folder: make import ARGS="source=HF_DIR output=CKPT_DIR"
	$(PYTHON) scripts/import_hf.py $(ARGS)

export: setup  ## export a checkpoint: make export ARGS="source=CKPT_DIR output=HF_DIR"
	$(PYTHON) scripts/export_hf.py $(ARGS)

bench: setup  ## run the benchmarks (each prints its ratios on its last line)
	$(PYTHON) bench/import_memory.py
	$(PYTHON) bench/calibration_cost.py
	$(PYTHON) bench/logits_cache.py
