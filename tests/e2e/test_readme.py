"""The commands in the README and docs/: each one is run here or by .ci/run."""

import json
import re
import subprocess

from helpers import REPO

README = (REPO / "README.md").read_text()
DOCS = sorted((REPO / "docs").rglob("*.md"))
CI = (REPO / ".ci" / "run").read_text()


def commands() -> list[str]:
    """Every command in the README's and docs/'s bash blocks."""
    text = "\n".join([README, *(page.read_text() for page in DOCS)])
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    lines = [line.split("  #")[0].strip() for block in blocks for line in block.splitlines()]
    return [line for line in lines if line]


def test_every_readme_command_is_run_somewhere():
    for command in commands():
        target = command.split()[1] if command.startswith("make ") else None
        covered = (target and f"make {target}" in CI) or command in RUN_HERE
        assert covered, f"README command not run by .ci/run or this test: {command}"


QAD_COMMAND = ('make distill EXP=demo ARGS="distill.quantize=fp8 distill.train_steps=20 '
               'distill.output=runs/demo/distill_depth_qad run.students=[depth]"')
HIDDEN_COMMAND = ('make distill EXP=demo ARGS="distill.teacher=online distill.train_steps=20 '
                  'distill.intermediate=[{student:0,teacher:null},{student:1,teacher:null}] '
                  'distill.output=runs/demo/distill_depth_hidden run.students=[depth]"')
LATENCY_COMMAND = ('make prune EXP=demo ARGS="prune=search run.students=[search] prune.target_params=null '
                   'prune.latency.reference={num_layers:3} prune.search.max_depth_pruning=0.75 prune.search.top_k=2 '
                   'prune.search.distill_steps=4 prune.latency.whole_limit=1000"')
HAND_COMMANDS = [  # in order: import, then export what was imported
    ".venv/bin/python scripts/import.py import.source=runs/demo/export_depth import.output=/tmp/reimported",
    ".venv/bin/python scripts/export.py export.source=/tmp/reimported export.output=/tmp/exported",
]
RUN_HERE = {
    "make pipeline EXP=llama31_8b_width_4b CLUSTER=slurm DRY_RUN=1",
    "make gpu-check PYTHON=python",
    "make cluster-check CLUSTER=slurm",
    "make cluster-check CLUSTER=slurm DRY_RUN=1",
    'make prune EXP=demo ARGS="prune.calib_samples=32"',
    'make distill EXP=demo ARGS="distill.train_steps=20 distill.kd_weight=0.5 distill.divergence=reverse_kl"',
    'make eval EXP=demo ARGS="eval.backend=lm_eval eval.model=teacher"',
    'make prune EXP=demo ARGS="prune=search prune.target_params=0.7 run.students=[search]"',
    QAD_COMMAND,
    HIDDEN_COMMAND,
    LATENCY_COMMAND,
    *HAND_COMMANDS,
}


def test_gpu_check_command_fails_clearly_without_a_gpu():
    """Here (no GPU) the README's first cluster command must fail, saying why; on a GPU node it runs."""
    import sys

    result = subprocess.run(["make", "-s", "gpu-check", f"PYTHON={sys.executable}"], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "error: no GPU on this machine" in result.stderr


def test_cluster_check_commands(tmp_path):
    """The dry run prints the one job (model, TP=8/2/1, compare) and writes nothing; the submission,
    where sbatch is missing or the cluster has no 8-GPU node (here: CI's one-node SLURM), fails in
    one line saying why. On a GPU cluster it submits, and the job is cancelled again."""
    import os

    env = {**os.environ, "PIPELINES_RUNS": str(tmp_path / "runs")}
    dry = subprocess.run(["make", "-s", "cluster-check", "CLUSTER=slurm", "DRY_RUN=1"], cwd=REPO,
                         capture_output=True, text=True, timeout=300, env=env)
    assert dry.returncode == 0, dry.stderr[-2000:]
    assert dry.stdout.startswith("#!/bin/bash") and dry.stdout.count("\nsrun ") == 5
    assert not (tmp_path / "runs").exists()
    sent = subprocess.run(["make", "-s", "cluster-check", "CLUSTER=slurm"], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env=env)
    if sent.returncode == 0:   # a cluster with 8-GPU nodes took it: this test does not run it
        job = sent.stdout.split("[cluster-check] job ")[1].split(";")[0]
        subprocess.run(["scancel", job], check=True)
        return
    assert "Traceback" not in sent.stderr, sent.stderr[-3000:]
    error = [line for line in sent.stderr.splitlines() if line.startswith("error: ")]
    assert len(error) == 1 and ("no sbatch on this machine" in error[0] or "sbatch refused" in error[0]), \
        sent.stderr[-2000:]
    assert "(fix: CLUSTER)" in error[0] or "(fix: cluster)" in error[0]


def test_slurm_dry_run_command():
    result = subprocess.run(["make", "-s", "pipeline", "EXP=llama31_8b_width_4b", "CLUSTER=slurm", "DRY_RUN=1"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("#!/bin/bash") == 11   # quantize and speed too
    assert "[memory] predicted peak per GPU" in result.stdout


def test_commands_on_the_demo_run(tmp_path, demo_run):
    """After `make demo` (CI runs it first), on a copy of its run: overrides rerun a stage (the
    changed config is detected), and import/export by hand round-trip."""
    import os
    import shutil

    shutil.copytree(REPO / "runs" / "demo", tmp_path / "runs" / "demo", ignore=shutil.ignore_patterns("bench_*"))
    env = {**os.environ, "PIPELINES_RUNS": str(tmp_path / "runs")}
    env.pop("MASTER_PORT", None)
    env.pop("MASTER_ADDR", None)
    for command in ('make prune EXP=demo ARGS="prune.calib_samples=32"',
                    'make distill EXP=demo ARGS="distill.train_steps=20 distill.kd_weight=0.5 '
                    'distill.divergence=reverse_kl"'):
        result = subprocess.run(["bash", "-c", command], cwd=REPO, capture_output=True, text=True,
                                timeout=600, env=env)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        assert "up to date" not in result.stdout  # the new settings rerun the stage
    distilled = (tmp_path / "runs" / "demo" / "distill_width" / "manifest.json").read_text()
    assert '"steps": 20' in distilled
    result = subprocess.run(["bash", "-c", 'make eval EXP=demo ARGS="eval.backend=lm_eval eval.model=teacher"'],
                            cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    teacher = json.loads((tmp_path / "runs" / "demo" / "eval" / "teacher" / "results.json").read_text())
    assert teacher["backend"] == "lm_eval" and teacher["mmlu"]["harness_group_acc"] == teacher["mmlu"]["micro"]
    result = subprocess.run(["bash", "-c", 'make prune EXP=demo ARGS="prune=search prune.target_params=0.7 '
                             'run.students=[search]"'], cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    searched = json.loads((tmp_path / "runs" / "demo" / "prune_search" / "manifest.json").read_text())
    assert searched["parameters"] <= searched["report"]["target_params"] < searched["report"]["params_before"]
    result = subprocess.run(["bash", "-c", LATENCY_COMMAND], cwd=REPO, capture_output=True, text=True, timeout=600,
                            env=env)   # docs/pruning.md's: as fast as 3 of 4 layers, ranked by 4 steps
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    ranked = json.loads((tmp_path / "runs" / "demo" / "prune_search" / "manifest.json").read_text())["report"]
    assert ranked["ranked_by"] == "val_loss_distilled" and len(ranked["candidates"]) == 2
    assert all(row["latency_ms"] <= ranked["targets"]["latency_ms"] for row in ranked["candidates"])
    for command in (QAD_COMMAND, HIDDEN_COMMAND):   # docs/deploy.md's and docs/distillation.md's
        result = subprocess.run(["bash", "-c", command.replace("runs/demo", f"{tmp_path}/runs/demo")], cwd=REPO,
                                capture_output=True, text=True, timeout=600, env=env)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    qad = json.loads((tmp_path / "runs" / "demo" / "distill_depth_qad" / "manifest.json").read_text())
    assert qad["quantize"] == "fp8" and (tmp_path / "runs" / "demo" / "distill_depth_qad" / "weights").is_dir()
    hidden = (tmp_path / "runs" / "demo" / "distill_depth_hidden" / "train" / "metrics.jsonl").read_text()
    assert '"hidden"' in hidden
    for command in HAND_COMMANDS:
        command = command.replace("/tmp/", f"{tmp_path}/")
        result = subprocess.run(["bash", "-c", command], cwd=REPO, capture_output=True, text=True, timeout=300,
                                env=env)
        assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "exported" / "config.json").exists()


def test_the_documented_sweeps_compare_their_points(documented_sweep_points):
    """docs/configuration.md's two `make sweep` commands (.ci/run runs them after `make demo`): the
    report compares their points, at 20 steps of 16 x 128 tokens (other sweeps of the run may be
    there too)."""
    table = json.loads((REPO / "runs" / "demo" / "report.json").read_text())["sweep"]

    def found(part: str, seeds: int) -> bool:
        return any(part in e["setting"] and e["seeds"] == seeds and e["tokens"] == 20 * 16 * 128 for e in table)

    assert found("distill.kd_weight=1", 1) and found("distill.kd_weight=0.5", 1), table
    assert found("distill.teacher=none", 2), table
