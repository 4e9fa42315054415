"""Which processes a stage is: the pipeline's order, rounds, invocations and process counts.

A per-student stage (``prune``, ``distill``, ``export``) runs once per ``run.students`` entry and
once per round of ``run.rounds`` (``prune@2``: round 2 only).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from pipelines.core import experiment
from pipelines.core.errors import require
from pipelines.stages import get, registry
from pipelines.stages.rules import processes, stage_parallel


def pipeline_stages(cfg) -> list[str]:
    """The stages ``make pipeline`` runs, in order (``correct`` only when enabled); with several
    rounds, each round's prune follows the previous round's distill (``prune@2``)."""
    stages = [s for s in registry() if (s != "correct" or bool(cfg.correct.enabled))
              and (s != "quantize" or len(cfg.quantize.formats) > 0)
              and (s != "speed" or bool(cfg.eval.speed.enabled))]
    count = len(experiment.rounds(cfg))
    if count < 2:
        return stages
    later = [f"{stage}@{number}" for number in range(2, count + 1) for stage in ("prune", "distill")]
    ordered = []
    for stage in stages:
        ordered += {"prune": ["prune@1"], "distill": ["distill@1", *later]}.get(stage, [stage])
    return ordered


def parse(spec: str) -> tuple[str, int | None]:
    """``prune@2`` -> ``("prune", 2)``; ``prune`` -> ``("prune", None)`` (every round)."""
    name, _, number = spec.partition("@")
    if not number:
        return name, None
    declared = get(name)
    require(declared.per_student and number.isdigit() and int(number) >= 1, f"{spec!r}: only per-student stages "
            "(prune, distill, export) take a round, as prune@2", "STAGE")
    return name, int(number)


def invocations(spec: str, cfg, overrides: list[str], quiet: bool = False) -> list[list[str]]:
    """Script argument lists of one stage: ``[script, override, ...]`` per invocation. A bare
    per-student stage with rounds leaves out the rounds whose previous round is not distilled."""
    stage, only = parse(spec)
    declared = get(stage)
    script = declared.script
    if not declared.per_student:
        return [[script, *overrides, *_parallel(cfg, stage)]]
    runs = experiment.student_runs(cfg)
    if only is not None:
        require(any(r.round == only for r in runs), f"{spec}: run.rounds has {max(r.round for r in runs)} "
                "rounds", "run.rounds")
        runs = [r for r in runs if r.round == only]
    kept = without_prune(overrides)
    chosen = []
    run_dir = Path(str(cfg.run.dir))
    for student in runs:
        # a later round's input: the round before's distilled student, or this round's earlier stage
        needed = {"prune": f"distill_{student.previous}", "distill": f"prune_{student.name}",
                  "export": f"distill_{student.name}",
                  "quantize": f"distill_{student.name}"}[stage]
        if only is None and student.previous and not (run_dir / needed / "manifest.json").exists():
            if not quiet:
                print(f"[{stage}] {student.name} waits for {run_dir / needed}: make {needed.split('_')[0]} first, "
                      "or make pipeline runs the rounds in order", flush=True)
            continue
        chosen.append([script, *kept, *_parallel(cfg, stage), *student.overrides])
    return chosen


def without_prune(overrides: list[str]) -> list[str]:
    """The overrides less ``prune=...``: each student sets its own prune config."""
    return [o for o in overrides if not re.match(r"^\+?prune=", o)]


def _parallel(cfg, stage: str) -> list[str]:
    """``parallel.*`` overrides from ``run.stage_parallel.<stage>``."""
    from omegaconf import OmegaConf

    changes = OmegaConf.to_container(cfg.run.stage_parallel, resolve=True).get(stage) or {}
    return [f"parallel.{key}={value}" for key, value in changes.items()]


def python_executable(cfg) -> str:
    """``cluster.python``; unset, the image's ``python`` in a container (the submitting host's
    interpreter is not there), else the interpreter that submits."""
    if cfg.cluster.get("python"):
        return str(cfg.cluster.python)
    return "python" if cfg.cluster.get("container_image") else sys.executable


def stage_processes(stage: str, cfg) -> tuple[int, int]:
    """``(nodes, processes per node)`` a stage runs with."""

    stage = parse(stage)[0]
    declared = get(stage)
    if not declared.distributed:
        return 1, 1
    if declared.model_parallel_only:
        layout = stage_parallel(cfg, stage)
        return 1, int(layout["tensor"]) * int(layout["pipeline"]) * int(layout.get("context", 1))
    if str(cfg.cluster.kind) == "slurm":
        return int(cfg.cluster.nodes), int(cfg.cluster.tasks_per_node)
    return 1, processes(cfg)
