"""Submission to a real SLURM (``.ci/run`` starts a one-node cluster): chained stages, 2-task
gloo steps, and preemption (USR1 -> checkpoint -> requeue -> resume). Skipped when no cluster answers."""

import json
import re
import shutil
import subprocess
import time

import pytest
from helpers import run_script

pytestmark = pytest.mark.slurm


def _slurm_up() -> bool:
    if not shutil.which("sinfo"):
        return False
    result = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True)
    return result.returncode == 0 and bool(result.stdout.strip())


if not _slurm_up():
    pytest.skip("no SLURM cluster answers (.ci/run starts one with .ci/slurm.sh)", allow_module_level=True)


def job(job_id: str) -> dict:
    text = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", text))


def wait_for(job_id: str, states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"),
             timeout: float = 600) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        info = job(job_id)
        if info.get("JobState") in states:
            return info
        time.sleep(1)
    raise AssertionError(f"job {job_id} still {job(job_id).get('JobState')} after {timeout} s")


def overrides(tmp_path, tiny_teacher, trained_teacher, tiny_data, steps=4):
    return ["cluster=slurm", "cluster.gpus_per_node=0", "cluster.tasks_per_node=2", "cluster.cpus_per_task=1",
            "cluster.time=00:15:00", "cluster.signal_seconds=60", "+cluster.env.OMP_NUM_THREADS=1",
            f"paths.runs={tmp_path}", "run.name=slurmtest", "run.students=[depth]", "prune.target_num_layers=2",
            f"data.output={tiny_data}", f"logits.teacher={trained_teacher}", "logits.k=16",
            "logits.samples=64", "logits.samples_per_shard=8", "logits.batch_size=4",
            f"distill.student={tiny_teacher}", "distill.sequence_length=32", "distill.global_batch_size=8",
            "distill.micro_batch_size=2", f"distill.train_steps={steps}", "distill.warmup_steps=1",
            "distill.eval_samples=8", "distill.eval_interval=0", "distill.save_interval=2"]


def test_chained_stages_with_two_gloo_tasks(tmp_path, tiny_teacher, trained_teacher, tiny_data):
    result = run_script("scripts/stage.py", "logits,distill",
                        *overrides(tmp_path, tiny_teacher, trained_teacher, tiny_data))
    assert result.returncode == 0, result.stdout + result.stderr
    ids = re.findall(r"\[slurm\] \w+: job (\d+)", result.stdout)
    assert len(ids) == 2, result.stdout
    # read at once: the first job (a Python process importing torch) cannot have ended yet
    assert job(ids[1]).get("Dependency", "").startswith(f"afterok:{ids[0]}"), job(ids[1])
    first, second = wait_for(ids[0]), wait_for(ids[1])
    logs = "\n".join(p.read_text() for p in (tmp_path / "slurmtest" / "slurm").glob("*.out"))
    assert first["JobState"] == "COMPLETED" and second["JobState"] == "COMPLETED", logs[-4000:]
    assert first["NumTasks"] == "2" and second["NumTasks"] == "2"
    cache = json.loads((tmp_path / "slurmtest" / "logits" / "manifest.json").read_text())
    assert cache["samples"] == 64 and len(cache["shards"]) == 8
    distilled = json.loads((tmp_path / "slurmtest" / "distill_depth" / "manifest.json").read_text())
    assert distilled["steps"] == 4 and distilled["final"]["val_loss"] > 0
    assert "rank 1: shard" in logs  # the second gloo task wrote its own shards


def test_usr1_checkpoints_requeues_and_resumes(tmp_path, tiny_teacher, trained_teacher, tiny_data):
    args = overrides(tmp_path, tiny_teacher, trained_teacher, tiny_data, steps=30) + [
        "distill.teacher=online", f"distill.teacher_checkpoint={trained_teacher}", "distill.save_interval=0"]
    result = run_script("scripts/stage.py", "distill", *args)
    assert result.returncode == 0, result.stdout + result.stderr
    (job_id,) = re.findall(r"\[slurm\] distill: job (\d+)", result.stdout)
    deadline = time.time() + 300
    while time.time() < deadline:
        logs = list((tmp_path / "slurmtest" / "slurm").glob("*.out"))
        log = logs[0] if logs else None
        if log and re.search(r"step [3-9]/30|step \d\d/30", log.read_text()):
            break
        time.sleep(0.5)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True)
    info = wait_for(job_id, timeout=600)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED", text[-4000:]
    assert int(info.get("Restarts", "0")) >= 1, info
    assert "preempted: checkpoint at step" in text and "resuming from step" in text
    assert "restart 1" in text
    manifest = json.loads((tmp_path / "slurmtest" / "distill_depth" / "manifest.json").read_text())
    assert manifest["steps"] == 30


@pytest.mark.slow    # ~2.5 min in CI: seven jobs; the sweep's sbatch scripts are checked in the default tier
def test_a_sweep_submits_one_job_per_point_after_the_shared_ones(tiny_teacher, tiny_data):
    from test_sweep import tiny_run

    args = [*tiny_run(tiny_teacher, tiny_data), "distill.train_steps=3", "cluster=slurm", "cluster.gpus_per_node=0",
            "cluster.tasks_per_node=1", "cluster.cpus_per_task=1", "cluster.time=00:15:00",
            "+cluster.env.OMP_NUM_THREADS=1"]
    result = run_script("scripts/stage.py", "sweep", *args, "-m", "distill.data_seed=1,2")
    assert result.returncode == 0, result.stdout + result.stderr
    ids = dict(re.findall(r"\[slurm\] ([\w.-]+): job (\d+)", result.stdout))
    assert list(ids)[:3] == ["prepare", "import", "prune"] and list(ids)[4:] == ["point-0", "point-1", "report"]
    cache = list(ids)[3]
    assert job(ids["point-1"]).get("Dependency", "").startswith(f"afterok:{ids[cache]}")
    infos = {name: wait_for(number) for name, number in ids.items()}
    run = tiny_teacher.parents[1] / "tiny"
    logs = "\n".join(p.read_text() for p in run.rglob("slurm/*.out"))
    assert all(info["JobState"] == "COMPLETED" for info in infos.values()), logs[-4000:]
    report = json.loads((run / "report.json").read_text())
    rows = [e for e in report["sweep"] if e["tokens"] == 3 * 4 * 64]
    assert len(rows) == 1 and rows[0]["seeds"] == 2 and rows[0]["val_loss_sd"] > 0, report["sweep"]
