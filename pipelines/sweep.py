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
import statistics
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from pipelines.errors import UserError, require

SECTIONS = ("distill", "logits")     # what a point may change
PATHS = ("distill.student", "distill.output", "distill.cache", "distill.teacher_checkpoint", "logits.output",
         "logits.teacher", "logits.reuse_from")
SEEDS = ("distill.data_seed", "distill.seed")   # points that differ only here are seeds of one setting
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
    from pipelines.experiment import override_value

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


def collect(run_dir: Path) -> list[dict]:
    """One row per point and student: the point's values, distill's final validation loss, the
    eval results of its distilled student, and its curve."""
    rows = []
    for record in sorted((run_dir / "sweep").glob("*/point.json")):
        point = record.parent
        values = json.loads(record.read_text())["values"]
        for distilled in sorted(point.glob("distill_*")):
            manifest = distilled / "manifest.json"
            if not manifest.exists():
                continue
            student = distilled.name[len("distill_"):]
            done = json.loads(manifest.read_text())
            result = point / "eval" / f"distilled_{student}" / "results.json"
            evaluated = json.loads(result.read_text()) if result.exists() else {}
            metrics = distilled / "train" / "metrics.jsonl"
            curve = [json.loads(line) for line in metrics.read_text().splitlines() if line] if metrics.exists() else []
            rows.append({"point": point.name, "values": values, "student": student, "tokens": done.get("tokens"),
                         "distill_val_loss": (done.get("final") or {}).get("val_loss"),
                         "val_loss": evaluated.get("val_loss"),
                         "corpus": (evaluated.get("corpus") or {}).get("accuracy"),
                         "mmlu": (evaluated.get("mmlu") or {}).get("macro"),
                         "curve": [(r["step"], r["val_loss"]) for r in curve if r.get("kind") == "eval"]})
    return rows


def setting(values: dict, shown: set | None = None) -> str:
    """A point's values without its seeds (the setting its seeds repeat), of the keys ``shown``."""
    kept = [f"{key}={value}" for key, value in values.items() if key not in SEEDS and (shown is None or key in shown)]
    return ", ".join(kept) or "(the run's)"


def compare(rows: list[dict]) -> list[dict]:
    """Rows grouped by setting and student: mean and standard deviation over seeds (``sd`` is
    ``None`` for one seed), and the mean curve at the steps every seed evaluated, best (lowest
    validation loss) first. A setting shows the keys whose values differ between points (those
    every point shares say nothing)."""
    keys = {key for row in rows for key in row["values"]}
    shown = {key for key in keys if len({row["values"].get(key) for row in rows}) > 1}
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((setting(row["values"], shown), row["student"]), []).append(row)
    table = []
    for (name, student), members in groups.items():
        entry = {"setting": name, "student": student, "seeds": len(members), "tokens": members[0]["tokens"],
                 "values": {key: value for key, value in members[0]["values"].items() if key not in SEEDS}}
        for metric in ("val_loss", "distill_val_loss", "corpus", "mmlu"):
            found = [m[metric] for m in members if m[metric] is not None]
            entry[metric] = statistics.fmean(found) if found else None
            entry[f"{metric}_sd"] = statistics.stdev(found) if len(found) > 1 else None
        curves = [dict(m["curve"]) for m in members]
        entry["curve"] = [(step, statistics.fmean(c[step] for c in curves))
                          for step in sorted(set.intersection(*(set(c) for c in curves)))]
        table.append(entry)
    return sorted(table, key=lambda e: (e["student"], float("inf") if e["val_loss"] is None and
                                        e["distill_val_loss"] is None else (e["val_loss"] or e["distill_val_loss"])))


def markdown(table: list[dict]) -> list[str]:
    def cell(entry, metric, pattern):
        value, sd = entry.get(metric), entry.get(f"{metric}_sd")
        if value is None:
            return "–"
        return format(value, pattern) + (f" ± {format(sd, pattern)}" if sd is not None else "")

    lines = ["", "## Sweep: every point (mean ± standard deviation over seeds)", "",
             "| student | setting | seeds | student tokens | val loss (eval) | val loss (distill) | corpus task | MMLU |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for entry in table:
        lines.append(f"| {entry['student']} | {entry['setting']} | {entry['seeds']} | {entry['tokens'] or 0:,} | "
                     f"{cell(entry, 'val_loss', '.4f')} | {cell(entry, 'distill_val_loss', '.4f')} | "
                     f"{cell(entry, 'corpus', '.3f')} | {cell(entry, 'mmlu', '.3f')} |")
    lines += ["", "Best first per student (lowest validation loss); one seed shows no deviation. The curves are "
              "in report_sweep.png, the points' folders under sweep/."]
    return lines


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    students = sorted({row["student"] for row in rows})
    figure, axes = plt.subplots(1, len(students), figsize=(6 * len(students), 4), squeeze=False)
    for axis, student in zip(axes[0], students):
        for row in rows:
            if row["student"] == student and row["curve"]:
                steps, losses = zip(*row["curve"])
                axis.plot(steps, losses, marker=".", label=row["point"])
        axis.set_title(f"student {student}")
        axis.set_xlabel("distillation step")
        axis.set_ylabel("validation loss")
        axis.legend(fontsize=6)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
