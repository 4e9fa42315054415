"""A sweep's results: one row per point and student, seeds of one setting as mean ± sd.

``make report`` on a run with a sweep (:mod:`pipelines.launch.sweep`) compares its points.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

SEEDS = ("distill.data_seed", "distill.seed")   # points that differ only here are seeds of one setting


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
