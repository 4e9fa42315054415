"""Check a whole experiment before anything runs: shapes, divisibility, parallel layouts, batches.

:func:`check` runs every stage's checks and raises :class:`~pipelines.core.errors.UserError` naming the key to fix. ``scripts/stage.py``
calls it before running or submitting anything, and the tests call it for every experiment
(including the 8B ones, with no compute).

:func:`check_students` checks each student of the run (and its round) with the architecture it
will have.
"""

from __future__ import annotations

import difflib
import functools
import re
from pathlib import Path

from omegaconf import OmegaConf, open_dict

from pipelines.core import experiment
from pipelines.core.errors import UserError, require
from pipelines.core.experiment import REPO
from pipelines.launch import time_plan
from pipelines.launch.plan import without_prune
from pipelines.model import build as model_lib
from pipelines.model import checkpoint
from pipelines.pruning import search
from pipelines.pruning.search import within_budget
from pipelines.stages import get, registry
from pipelines.stages.rules import (TRAINING, chat_lengths, layout_fits, lists, positive, positive_whole,
                                     student_architecture)

RUN_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")   # a folder name that stays in the runs folder
SLURM_NAME = re.compile(r"[A-Za-z0-9_.,:-]+")            # a partition, account, QOS or job-name prefix


def check(cfg, stages: list[str], source: dict | None = None, student: dict | None = None) -> dict:
    """Validate ``stages`` of the experiment with each stage's own checks (:class:`pipelines.stages.base.Stage`),
    on ``model.*`` and the layouts planned; returns the architectures and layouts checked.
    ``source``: the architecture prune starts from when it is not the teacher (a later round);
    ``student``: the student's, when another config planned it (default: ``cfg.prune`` of ``source``)."""

    name = str(cfg.run.name)
    require(RUN_NAME.fullmatch(name) is not None, f"run.name={name!r}: a run name is letters, digits and "
            "'.', '_' or '-', not starting with '.' (it names a folder under the runs folder, and SLURM jobs)",
            "run.name")
    lists(cfg)
    declared = registry()
    teacher = model_lib.architecture(cfg.model)
    source = source or teacher
    student = student or student_architecture(cfg, source)
    checked = {"teacher": teacher, "source": source, "student": student, "layouts": {}}
    for key in ("tensor", "pipeline", "context"):
        positive_whole(cfg.parallel.get(key, 1), f"parallel.{key}", 1, inclusive=True)
    positive(cfg.parallel.get("timeout_minutes", 30), "parallel.timeout_minutes")
    cluster = cfg.cluster
    for key in ("partition", "account", "qos", "job_prefix") if str(cluster.kind) == "slurm" else ():
        value = cluster.get(key)   # written into #SBATCH lines: a name, not shell
        require(value is None or SLURM_NAME.fullmatch(str(value)) is not None, f"cluster.{key}={value!r}: "
                "letters, digits and '.', '_', '-', ',' or ':' only (it goes into the batch script)", f"cluster.{key}")
    if str(cluster.kind) == "slurm" and cluster.get("mem") is not None:
        require(re.fullmatch(r"\d+[KMGT]?", str(cluster.mem)) is not None, f"cluster.mem={cluster.mem!r}: "
                "a size as sbatch --mem takes it, e.g. 0 (all of the node's memory), 256G or 512000M", "cluster.mem")
    if cluster.get("gpus_per_node") is not None:   # first: tasks_per_node follows it
        positive_whole(cluster.gpus_per_node, "cluster.gpus_per_node", inclusive=True)
    for key in ("processes", "nodes", "tasks_per_node", "cpus_per_task") if str(cluster.kind) == "slurm" \
            else ("processes",):
        if cluster.get(key) is not None:
            positive_whole(cluster[key], f"cluster.{key}", 1, inclusive=True)
    chat_lengths(cfg, stages)
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
            declared[stage].checks(cfg, {"prune": source, "quantize": student}.get(stage, teacher), layout)
        if stage == "distill":
            layout_fits(cfg, stage, teacher, "online teacher")
            require(int(cfg.logits.sequence_length) == int(cfg.distill.sequence_length),
                    "logits.sequence_length differs from distill.sequence_length", "logits.sequence_length")
        if stage == "eval":
            model_lib.validate(student, int(layout["tensor"]), 1)
    return checked


def compose_pipeline(overrides: list[str], check_keys: bool = False):
    """``configs/pipeline.yaml`` with ``overrides``; a missing experiment or group option is one line.
    ``check_keys``: also refuse a key the experiment file sets that no config group defines (the
    launcher's first composition of a command)."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException

    try:
        with initialize_config_dir(str(REPO / "configs"), version_base="1.3"):
            full = compose("pipeline", overrides=overrides, return_hydra_config=True)
            choices = {group: option for group, option in full.hydra.runtime.choices.items()
                       if not group.startswith("hydra") and "/" not in group and option is not None}
            if check_keys and choices.get("experiment"):
                _refuse_unknown_keys(full, choices)
            with open_dict(full):
                del full["hydra"]   # what compose returns without return_hydra_config
            return full
    except MissingConfigException as error:
        missing = str(getattr(error, "missing_cfg_file", "") or "")
        group, _, name = missing.rpartition("/")
        options = ", ".join(getattr(error, "options", None) or [])
        key = "EXP (experiment=...)" if group == "experiment" else group or "the config overrides"
        raise UserError(f"no {group or 'config'} {name!r} in configs/{group}/; one of: {options}", key) from None
    except OverrideParseException as error:
        raise UserError(f"bad override syntax: {str(error).splitlines()[0]} (Hydra's override grammar)",
                        "ARGS") from None
    except ConfigCompositionException as error:
        first = str(error).splitlines()[0]
        unknown = re.search(r"Could not override '([^']+)'", first)
        raise UserError(f"bad override: {first}", unknown.group(1) if unknown else "ARGS") from None


OPEN_SECTIONS = ("run.stage_parallel", "cluster.env", "prune.latency.reference")   # free-form: any key may be set there


def _keys(node, prefix: str = "") -> set[str]:
    found = set()
    if isinstance(node, dict):
        for key, value in node.items():
            path = f"{prefix}.{key}" if prefix else str(key)
            found.add(path)
            if not path.startswith(OPEN_SECTIONS):
                found |= _keys(value, path)
    return found


def _refuse_unknown_keys(full, choices: dict) -> None:
    """An experiment file sets only keys the config groups define: a typo (``train_step: 20`` beside
    ``train_steps``) would compose as a new key and change nothing (an override's typo Hydra
    refuses itself)."""
    known = _known_keys(tuple(sorted((g, str(o)) for g, o in choices.items() if g not in ("experiment", "prune"))))
    ours = {key for key in _keys(OmegaConf.to_container(full, resolve=False)) if not key.startswith("hydra")}
    unknown = sorted(key for key in ours - known if key.rpartition(".")[0] in known or "." not in key)
    if unknown:
        key = unknown[0]
        parent, _, leaf = key.rpartition(".")
        siblings = [k.rpartition(".")[2] for k in known if k.rpartition(".")[0] == parent]
        close = difflib.get_close_matches(leaf, siblings, n=1)
        hint = f"; did you mean {parent + '.' if parent else ''}{close[0]}?" if close else ""
        raise UserError(f"unknown key {key} in configs/experiment/{choices['experiment']}.yaml: no config "
                        f"group defines it, so it would change nothing{hint}", key)


@functools.lru_cache(maxsize=16)
def _known_keys(groups: tuple[tuple[str, str], ...]) -> frozenset[str]:
    """The keys of the pipeline with these group choices, under every prune group (an experiment
    sets each student's prune keys)."""
    from hydra import compose

    from pipelines.stages.rules import PRUNE_MODES

    known: set[str] = set()
    for prune in PRUNE_MODES:
        reference = compose("pipeline", overrides=[*(f"{g}={o}" for g, o in groups), f"prune={prune}"])
        known |= _keys(OmegaConf.to_container(reference, resolve=False))
    return frozenset(known)


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
        gpu = time_plan.cluster_gpu(one)
        if "prune" in stages and gpu is not None and search.ranked(one) and search.latency_target(one):
            for line in time_plan.latency_lines(one, checked[-1]["source"], gpu):
                print(f"[time] {student.name}: {line}", flush=True)
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
