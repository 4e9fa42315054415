"""The tiny pipeline end to end, through the launcher every make target calls.

Slow tier: the demo experiment (configs/model/tiny.yaml, the Austen corpus) at a smaller size,
every stage as its own script, then a second run finds every stage up to date (~4 min).
Default tier: after ``make demo`` (CI runs it first), a second run of the demo finds every stage
up to date, in place, as a user's second ``make demo`` would.
"""

import json
import os
import re
import subprocess
import sys

import pytest
from helpers import REPO

from pipelines.core.artifacts import read_manifest
from pipelines.stages import registry

SMALL = ["experiment=demo", "run.name=e2e", "correct.train_steps=30", "correct.eval_interval=15",
         "correct.save_interval=15", "correct.log_interval=10", "distill.train_steps=6",
         "distill.global_batch_size=8", "distill.micro_batch_size=8", "distill.warmup_steps=1",
         "distill.eval_interval=3", "distill.save_interval=3", "distill.log_interval=3",
         "prune.calib_samples=16", "prune.eval_samples=8", "eval.limit=1", "eval.val_samples=8",
         "eval.mmlu.subjects=[astronomy,virology]", "logits.samples_per_shard=16"]


def pipeline(runs, *extra):
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    return subprocess.run([sys.executable, "scripts/stage.py", "pipeline", *SMALL, *extra],
                          cwd=REPO, capture_output=True, text=True, timeout=1200,
                          env={**env, "PIPELINES_RUNS": str(runs), "OMP_NUM_THREADS": "2"})


def up_to_date(result) -> set[str]:
    return {line.split("]")[0][1:] for line in result.stdout.splitlines() if "is up to date; skipping" in line}


def started(result) -> list[str]:
    """The stages whose process the launcher started (it prints ``[stage] <python> scripts/...``)."""
    return [line.split("]")[0][1:] for line in result.stdout.splitlines()
            if line.startswith("[") and re.search(r" scripts/\w+\.py( |$)", line)]


def test_a_second_make_demo_finds_every_stage_up_to_date(demo_run):
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "PIPELINES_RUNS")}
    again = subprocess.run(["make", "-s", "pipeline", "EXP=demo", "CLUSTER=local"], cwd=REPO, capture_output=True,
                           text=True, timeout=900, env=env)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert up_to_date(again) == set(registry()) - {"report"}, again.stdout[-3000:]   # the report is rewritten
    assert "step 1" not in again.stdout  # nothing trained again
    # the launcher made the same check: the report's is the one stage process it started
    assert started(again) == ["report"], again.stdout[-3000:]


@pytest.mark.slow
def test_the_tiny_pipeline_end_to_end_then_every_stage_is_up_to_date(tmp_path):
    first = pipeline(tmp_path)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    run = tmp_path / "e2e"
    folders = {"import": run / "import", "correct": run / "correct", "prune": run / "prune_depth",
               "logits": run / "logits", "distill": run / "distill_width", "export": run / "export_depth",
               "eval": run / "eval" / "distilled_width"}
    for name, folder in folders.items():
        assert read_manifest(folder)["stage"] == name, folder
    assert read_manifest(run / "distill_depth")["steps"] == 6
    report = json.loads((run / "report.json").read_text())
    models = ("teacher", "pruned_depth", "pruned_width", "distilled_depth", "distilled_width")
    assert all(report[m]["val_loss"] > 0 for m in models) and report["students"] == ["depth", "width"]
    assert all(report[m]["corpus_questions"] == 500 and 0 <= report[m]["corpus"] <= 1 for m in models)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(run / "export_width")

    again = pipeline(tmp_path)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    skipped = up_to_date(again)
    assert skipped == set(registry()) - {"report"}, skipped  # the report is always rewritten
    assert "step 1" not in again.stdout  # nothing trained again
    assert started(again) == ["report"], again.stdout[-3000:]
