"""Sweeps: every point of a grid of recipe settings, each in its own folder, sharing the rest.

    make sweep EXP=demo ARGS="-m distill.kd_weight=1,0.7,0.5 logits.k=16,64"

Sweep overrides use Hydra's multirun syntax (``a,b``, ``range(...)``, ``choice(...)``; ``-m`` is
accepted and optional); the grid is their product. A point sweeps how the students are taught
(``distill.*``, ``logits.*``), never what they are: its students are the run's pruned ones, its
teacher the run's, so the shared stages (prepare, import, correct, prune) run once in the run.

Point ``p`` lives in ``runs/<exp>/sweep/<p>/`` (``p`` names its values, e.g.
``distill.kd_weight=0.5,logits.k=16``): its ``distill_<student>/``, ``eval/`` and ``point.json``.
A finished point keeps its weights and metrics, not its optimizer state
(``distill.keep_final_checkpoint=false`` unless set: a grid of them would fill the disk).
The point's config is the run's with ``run.dir`` pointed there. Points share one logits cache per
distinct cache setting, ``sweep/logits-<hash>/``, so no cache is computed twice (and the run's
own ``logits/`` is left as it is). Every stage of a point skips and resumes
as in a run. ``make report`` compares the points (:func:`collect`), the seeds of a setting
(``distill.data_seed``, ``distill.seed``) as mean ± standard deviation.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from pipelines.core.errors import UserError, require
from pipelines.core.experiment import override_value
from pipelines.launch import preflight
from pipelines.launch.local import run_local
from pipelines.launch.plan import pipeline_stages
from pipelines.launch.preflight import check_students, compose_pipeline
from pipelines.launch.slurm import sbatch_script, submit_jobs
from pipelines.stages import get
from pipelines.stages.rules import lists

SECTIONS = ("distill", "logits")     # what a point may change
PATHS = ("distill.student", "distill.output", "distill.cache", "distill.teacher_checkpoint", "logits.output",
         "logits.teacher", "logits.reuse_from")
SHARED_STAGES = ("prepare", "import", "correct", "prune")
POINT_STAGES = ("logits", "distill", "eval")
MULTIRUN_FLAGS = ("-m", "--multirun")


@dataclass(frozen=True)
class Point:
    name: str                      # the folder under sweep/
    values: tuple[tuple[str, str], ...]   # (key, value) of each swept key

    @property
    def overrides(self) -> list[str]:
        return [f"{key}={value}" for key, value in self.values]


def split(overrides: list[str]) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """``(fixed overrides, [(key, values), ...])``: the sweep axes in Hydra's multirun syntax."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    fixed, axes = [], []
    for text in overrides:
        if text in MULTIRUN_FLAGS:
            continue
        try:
            (parsed,) = OverridesParser.create().parse_overrides([text])
        except HydraException as error:
            raise UserError(f"bad override {text!r}: {str(error).splitlines()[0]}", "ARGS") from None
        if parsed.is_sweep_override():
            axes.append((parsed.get_key_element(), list(parsed.sweep_string_iterator())))
        else:
            fixed.append(text)
    return fixed, axes


def check(cfg, axes: list[tuple[str, list[str]]]) -> None:
    """Every swept key exists and only changes how the students are taught; stops naming the key."""
    require(axes, "a sweep needs at least one swept key, e.g. distill.kd_weight=1,0.5 (Hydra's multirun syntax)",
            "ARGS")
    require(not list(cfg.run.get("rounds") or []), "a sweep runs on the run's pruned students, one round; "
            "sweep the rounds as runs of their own (run.name=...)", "run.rounds")
    for key, values in axes:
        require(OmegaConf.select(cfg, key, default=_MISSING) is not _MISSING, f"unknown key {key} in the sweep",
                key)
        section = key.split(".")[0]
        require(section in SECTIONS and key not in PATHS, f"a sweep over {key}: a point shares the run's teacher, "
                f"data and pruned students and sweeps only {' and '.join(s + '.*' for s in SECTIONS)} "
                "(not paths); make a run of its own for it (run.name=...)", key)
        require(len(set(values)) == len(values), f"{key} repeats a value in the sweep: {','.join(values)}", key)


_MISSING = object()


def points(axes: list[tuple[str, list[str]]], fixed: list[str] = ()) -> list[Point]:
    """The grid: one point per combination, named by its swept values. The fixed overrides of the
    swept sections (``distill.teacher=none``) are values of every point too, and add their hash to
    its name, so that sweeps with other fixed settings never share a point's folder."""
    constant = tuple(tuple(text.split("=", 1)) for text in fixed
                     if "=" in text and text.split("=", 1)[0].split(".")[0] in SECTIONS)
    suffix = ""
    if constant:
        suffix = ",fixed-" + hashlib.sha256(json.dumps(constant).encode()).hexdigest()[:8]
    keys = [key for key, _ in axes]
    grid = []
    for values in itertools.product(*(values for _, values in axes)):
        swept = tuple(zip(keys, values))
        name = ",".join(f"{key}={value}" for key, value in swept).replace("/", "_").replace(" ", "") + suffix
        grid.append(Point(name, constant + swept))
    return grid


def folder(cfg, point: Point) -> Path:
    return Path(str(cfg.run.dir)) / "sweep" / point.name


def base_overrides(cfg, point: Point) -> list[str]:
    """What makes a run's config a point's: its values, its folder, the run's teacher and students."""

    run = Path(str(cfg.run.dir)).resolve()
    keep = [] if "distill.keep_final_checkpoint" in dict(point.values) else ["distill.keep_final_checkpoint=false"]
    return [*keep, *point.overrides, f"run.dir={override_value(str(run / 'sweep' / point.name))}",
            f"run.teacher=${{teacher:{run}}}",
            f"distill.student={run}/prune_${{run.student}}"]


def cache_settings(cfg) -> dict:
    """The logits section as it decides the cache's bytes (paths aside)."""
    logits = OmegaConf.to_container(cfg.logits, resolve=True)
    return {key: value for key, value in logits.items() if key not in ("output", "teacher", "reuse_from")}


def cache_folder(run_cfg, point_cfg) -> Path | None:
    """The cache a point reads: one per distinct setting under ``sweep/`` (never the run's own
    ``logits/``, which a sweep leaves as it is; its finished shards are linked when the identity
    is the same, ``logits.reuse_from``); ``None`` when its students learn without the cache."""
    if str(point_cfg.distill.teacher) != "cache":
        return None
    run = Path(str(run_cfg.run.dir)).resolve()
    settings = cache_settings(point_cfg)
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    return run / "sweep" / f"logits-{digest}"


def write_point(cfg, point: Point, cache: Path | None) -> None:
    where = folder(cfg, point)
    where.mkdir(parents=True, exist_ok=True)
    record = {"values": dict(point.values), "cache": str(cache) if cache else None}
    (where / "point.json").write_text(json.dumps(record, indent=2) + "\n")


# ----------------------------------------------------------------------------- the comparison


def plan_sweep(overrides: list[str]):
    """``(run config, fixed overrides, shared stages, caches, points)`` of a sweep, every config
    checked: caches ``[(folder, config, overrides)]`` one per distinct setting, points
    ``[(point, config, overrides)]``."""

    fixed, axes = split(overrides)
    cfg = compose_pipeline(fixed, check_keys=True)
    lists(cfg)
    check(cfg, axes)
    planned, caches = [], {}
    for point in points(axes, fixed):
        extra = base_overrides(cfg, point)
        try:
            one = compose_pipeline([*fixed, *extra])
        except UserError as error:
            raise UserError(f"sweep point {point.name}: {error.message}", error.key) from None
        cache = cache_folder(cfg, one)
        if cache is not None:
            extra.append(f"logits.output={cache}")
            one = compose_pipeline([*fixed, *extra])
            caches.setdefault(cache, (one, [*fixed, *extra]))
        planned.append((point, one, [*fixed, *extra], cache))
    shared = [s for s in pipeline_stages(cfg) if s in SHARED_STAGES]
    names = shared + ["logits"] * bool(caches) + ["distill", "eval"]
    students = check_students(cfg, names, fixed)
    preflight.check(cfg, [n for n in names if not get(n).per_student and n != "logits"], student=students[0]["student"])
    for point, one, extra, _ in planned:
        try:
            check_students(one, ["distill", "eval"], extra)
        except UserError as error:
            raise UserError(f"sweep point {point.name}: {error.message}", error.key) from None
    for one, _ in caches.values():
        preflight.check(one, ["logits"], student=students[0]["student"])
    return cfg, fixed, shared, [(folder, *value) for folder, value in caches.items()], planned


def run_sweep(overrides: list[str], dry_run: bool) -> None:
    """``stage.py sweep [-m] key=a,b ...``: the shared stages once, each distinct cache once, then
    every point's distill and eval, then the report with the comparison (see :mod:`pipelines.launch.sweep`)."""

    cfg, fixed, shared, caches, points = plan_sweep(overrides)
    print(f"[sweep] {len(points)} points, {len(caches)} logits cache(s), under {Path(str(cfg.run.dir)) / 'sweep'}/",
          flush=True)
    for point, _, _, cache in points:
        write_point(cfg, point, cache)
    if str(cfg.cluster.kind) == "slurm":
        jobs = [(stage, sbatch_script(stage, cfg, fixed), [index - 1] if index else [])
                for index, stage in enumerate(shared)]
        # every job logs into the run's slurm/ (the one folder submit_jobs makes)
        for folder, one, extra in caches:
            jobs.append((folder.name, sbatch_script(folder.name, cfg, fixed, [("logits", one, extra)]),
                         [len(jobs) - 1] if jobs else []))
        ready = [len(jobs) - 1] if jobs else []
        first = len(jobs)
        for number, (point, one, extra, _) in enumerate(points):
            steps = [("distill", one, extra), ("eval", one, extra)]
            jobs.append((f"point-{number}", sbatch_script(f"point-{number}", cfg, fixed, steps), ready))
        jobs.append(("report", sbatch_script("report", cfg, fixed), list(range(first, len(jobs)))))
        submit_jobs(jobs, cfg, dry_run)
        return
    require(not dry_run, "--dry-run is for cluster=slurm", "cluster")
    for stage in shared:
        run_local(stage, cfg, fixed)
    for folder, one, extra in caches:
        run_local("logits", one, extra)
    for number, (point, one, extra, _) in enumerate(points, 1):
        print(f"[sweep] point {number}/{len(points)}: {point.name}", flush=True)
        run_local("distill", one, extra)
        run_local("eval", one, extra)
    run_local("report", cfg, fixed)
