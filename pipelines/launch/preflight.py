"""Check a whole experiment before anything runs: shapes, divisibility, parallel layouts, batches.

:func:`check` runs every stage's checks and raises :class:`~pipelines.core.errors.UserError` naming the key to fix. ``scripts/stage.py``
calls it before running or submitting anything, and the tests call it for every experiment
(including the 8B ones, with no compute).

:func:`check_students` checks each student of the run (and its round) with the architecture it
will have.
"""

from __future__ import annotations

import re
from pathlib import Path

from pipelines.core import experiment
from pipelines.core.errors import UserError, require
from pipelines.core.experiment import REPO
from pipelines.launch.plan import without_prune
from pipelines.model import build as model_lib
from pipelines.model import checkpoint
from pipelines.pruning.search import within_budget
from pipelines.stages import get, registry
from pipelines.stages.rules import TRAINING, layout_fits, positive, positive_whole, student_architecture


RUN_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")   # a folder name that stays in the runs folder


def check(cfg, stages: list[str], source: dict | None = None, student: dict | None = None) -> dict:
    """Validate ``stages`` of the experiment with each stage's own checks (:class:`pipelines.stages.base.Stage`),
    on ``model.*`` and the layouts planned; returns the architectures and layouts checked.
    ``source``: the architecture prune starts from when it is not the teacher (a later round);
    ``student``: the student's, when another config planned it (default: ``cfg.prune`` of ``source``)."""

    name = str(cfg.run.name)
    require(RUN_NAME.fullmatch(name) is not None, f"run.name={name!r}: a run name is letters, digits and "
            "'.', '_' or '-', not starting with '.' (it names a folder under the runs folder, and SLURM jobs)",
            "run.name")
    declared = registry()
    teacher = model_lib.architecture(cfg.model)
    source = source or teacher
    student = student or student_architecture(cfg, source)
    checked = {"teacher": teacher, "source": source, "student": student, "layouts": {}}
    for key in ("tensor", "pipeline", "context"):
        positive_whole(cfg.parallel.get(key, 1), f"parallel.{key}", 1, inclusive=True)
    positive(cfg.parallel.get("timeout_minutes", 30), "parallel.timeout_minutes")
    cluster = cfg.cluster
    if cluster.get("gpus_per_node") is not None:   # first: tasks_per_node follows it
        positive_whole(cluster.gpus_per_node, "cluster.gpus_per_node", inclusive=True)
    for key in ("processes", "nodes", "tasks_per_node", "cpus_per_task") if str(cluster.kind) == "slurm" \
            else ("processes",):
        if cluster.get(key) is not None:
            positive_whole(cluster[key], f"cluster.{key}", 1, inclusive=True)
    # training sections first: other sections interpolate their keys (logits.temperature)
    for stage in sorted(stages, key=lambda name: name not in TRAINING):
        layout = None
        if declared[stage].distributed:
            arch, what = (student, "student") if stage == "distill" else (teacher, "teacher")
            data_parallel, planned = layout_fits(cfg, stage, arch, what)
            layout = {"tensor": int(planned["tensor"]), "pipeline": int(planned["pipeline"]),
                      "context": int(planned.get("context", 1)), "data": data_parallel}
            checked["layouts"][stage] = {**planned, "data": data_parallel}
        if declared[stage].checks:
            declared[stage].checks(cfg, source if stage == "prune" else teacher, layout)
        if stage == "distill":
            layout_fits(cfg, stage, teacher, "online teacher")
            require(int(cfg.logits.sequence_length) == int(cfg.distill.sequence_length),
                    "logits.sequence_length differs from distill.sequence_length", "logits.sequence_length")
        if stage == "eval":
            model_lib.validate(student, int(layout["tensor"]), 1)
    return checked


def compose_pipeline(overrides: list[str]):
    """``configs/pipeline.yaml`` with ``overrides``; a missing experiment or group option is one line."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import ConfigCompositionException, MissingConfigException

    try:
        with initialize_config_dir(str(REPO / "configs"), version_base="1.3"):
            return compose("pipeline", overrides=overrides)
    except MissingConfigException as error:
        missing = str(getattr(error, "missing_cfg_file", "") or "")
        group, _, name = missing.rpartition("/")
        options = ", ".join(getattr(error, "options", None) or [])
        key = "EXP (experiment=...)" if group == "experiment" else group or "the config overrides"
        raise UserError(f"no {group or 'config'} {name!r} in configs/{group}/; one of: {options}", key) from None
    except ConfigCompositionException as error:
        raise UserError(f"bad override: {str(error).splitlines()[0]}", "ARGS") from None


def check_students(cfg, names: list[str], overrides: list[str]) -> list[dict]:
    """Every student of every round, checked before any compute: its own config (``prune=<student>``
    and its round's keys) for the per-student stages and eval, with the source its round prunes:
    the round before's distilled student when it exists, else the shape planned for it (a search's
    largest within its budget; a budget only its smaller candidates meet warns instead). Returns what :func:`pipelines.launch.preflight.check` returned for each."""

    stages = [name for name in names if get(name).per_student or name == "eval"]
    kept = without_prune(overrides)
    planned: dict[str, dict] = {}
    searched: dict[str, dict] = {}   # a searched student's smallest candidate
    checked = []
    for student in experiment.student_runs(cfg):
        try:
            one = compose_pipeline([*kept, *student.overrides])
        except UserError as error:
            key = "run.rounds" if student.round else error.key
            raise UserError(f"student {student.name}: {error.message}", key) from None
        source = planned.get(student.previous)
        made = Path(str(cfg.run.dir)) / f"distill_{student.previous}"
        if student.previous and (made / "manifest.json").exists():
            source = checkpoint.read_architecture(made)[0]
        try:
            checked.append(check(one, stages, source=source))
        except UserError as error:
            smallest = searched.get(student.previous)
            if source is not planned.get(student.previous) or smallest is None:
                raise _in_round(student, error) from None
            # a search may choose any of its top_k candidates: refuse only if the smallest fails too
            try:
                checked.append(check(one, stages, source=smallest))
            except UserError:
                raise _in_round(student, error) from None
            print(f"[check] {student.name}: {error.message}, if round {student.round - 1}'s "
                  "search chooses its largest candidate; it is checked again when that round is distilled",
                  flush=True)
        planned[student.name] = checked[-1]["student"]
        if str(one.prune.mode) == "search":

            candidates = within_budget(one, checked[-1]["source"])[:int(one.prune.search.top_k)]
            searched[student.name] = candidates[-1]
    return checked


def _in_round(student, error: UserError) -> UserError:
    """``error`` naming the round it is about (without rounds: as it is)."""
    if not student.round:
        return error
    what = f"round {student.round}" + (f", pruning {student.previous}" if student.previous else "")
    return UserError(f"student {student.name} ({what}): {error.message}", error.key)
