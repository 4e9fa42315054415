"""The launcher's entry: run stages here or submit them to SLURM (``scripts/stage.py``, behind every ``make`` target).

A stage (:class:`pipelines.stages.base.Stage`, by name) is one or more runs of ``scripts/<name>.py``:
per-student stages (``prune``, ``distill``, ``export``) run once per ``run.students`` entry with
``prune=<student>``, and once per round of ``run.rounds`` (``prune@2``: round 2 only; ``pipeline``
runs logits, prune@1, distill@1, prune@2, distill@2, ...; a bare ``prune`` runs the rounds whose
previous round is distilled and says which wait). Locally, stages that
use the parallel runtime run under ``torchrun`` when ``cluster.processes`` > 1. On SLURM
(``cluster=slurm``) each stage is one ``sbatch`` job whose steps ``srun`` one task per GPU (the
runtime reads SLURM's environment); ``pipeline`` submits every stage at once, chained with
``--dependency=afterok``. Run here, a stage whose every output is up to date
(:func:`pipelines.stages.base.up_to_date`) starts no process.

Preemption: jobs ask for ``--signal=B:USR1@<cluster.signal_seconds>`` and ``--requeue``. The
batch script forwards USR1 to the running step; the stage (see :mod:`pipelines.training.preemption`)
checkpoints, touches ``$PD_REQUEUE_MARKER`` and exits with status 75, and the script requeues
the job, which then skips the finished stages and resumes the interrupted one.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from pipelines.core.artifacts import replaced_folders
from pipelines.core.errors import UserError, require
from pipelines.core.experiment import require_this_checkout
from pipelines.launch import memory_plan, preflight, time_plan
from pipelines.launch.cli import quiet_known_noise
from pipelines.launch.local import run_local
from pipelines.launch.plan import parse, pipeline_stages
from pipelines.launch.preflight import check_students, compose_pipeline
from pipelines.launch.slurm import submit
from pipelines.launch.sweep import run_sweep
from pipelines.stages import get
from pipelines.stages.rules import lists


def runs_on_gpus(cfg) -> bool:
    """Whether the stages run on GPUs: a SLURM cluster with GPUs, or this machine when it has one."""
    if str(cfg.cluster.kind) == "slurm":
        return int(cfg.cluster.gpus_per_node) > 0
    import torch

    return torch.cuda.is_available()


def clean_replaced(cfg) -> None:
    """``make clean-replaced``: remove the old results that ``FORCE=1`` kept aside in the run folder and
    the data folder, naming each (nothing else is touched)."""
    folders = replaced_folders([Path(str(cfg.run.dir)), Path(str(cfg.paths.data))])
    for folder in folders:
        print(f"[clean-replaced] removing {folder}", flush=True)
        shutil.rmtree(folder)
    print(f"[clean-replaced] {len(folders)} kept-aside result(s) removed", flush=True)


def main(argv: list[str]) -> None:
    """``stage.py STAGE[,STAGE...]|pipeline [--dry-run] [hydra overrides]``."""

    quiet_known_noise()
    require_this_checkout()
    usage = "usage: scripts/stage.py STAGE|pipeline|sweep|clean-replaced [--dry-run] [key=value ...]"
    if not argv or argv[0].startswith("-"):
        raise UserError(usage, "STAGE")
    stage, rest = argv[0], argv[1:]
    dry_run = "--dry-run" in rest
    overrides = [a for a in rest if a != "--dry-run"]
    if stage == "sweep":
        run_sweep(overrides, dry_run)
        return
    cfg = compose_pipeline(overrides, check_keys=True)
    lists(cfg)   # before the students are read from run.students
    if stage == "clean-replaced":
        clean_replaced(cfg)
        return
    stages = pipeline_stages(cfg) if stage == "pipeline" else stage.split(",")
    names = list(dict.fromkeys(parse(spec)[0] for spec in stages))  # an unknown name stops here

    students = check_students(cfg, names, overrides)
    checked = preflight.check(cfg, [n for n in names if not get(n).per_student], student=students[0]["student"])
    checked["layouts"] = {**checked["layouts"], **students[0]["layouts"]}   # the memory plan's
    if runs_on_gpus(cfg):

        estimates = memory_plan.plan(cfg, names, {**checked, "students": [s["student"] for s in students]})
        if estimates:
            print(f"[memory] predicted peak per GPU (limit cluster.gpu_memory_gb="
                  f"{cfg.cluster.get('gpu_memory_gb') or 80}):", flush=True)
            for estimate in estimates:
                print(f"[memory]   {estimate.line()}", flush=True)
        memory_plan.check(cfg, estimates)
        timed = time_plan.plan(cfg, names, {**checked, "students": [s["student"] for s in students]})
        if timed:
            print(f"[time] predicted on {time_plan.cluster_gpu(cfg).name} (cluster.gpu={cfg.cluster.gpu}; "
                  "pipelines/launch/time_plan.py):", flush=True)
            for line in time_plan.job_lines(timed):
                print(f"[time]   {line}", flush=True)
    if str(cfg.cluster.kind) == "slurm":
        submit(stages, cfg, overrides, dry_run)
        return
    require(not dry_run, "--dry-run is for cluster=slurm", "cluster")
    for name in stages:
        run_local(name, cfg, overrides)
