"""The recovery report: teacher, pruned and distilled side by side (``scripts/report.py``).

Reads ``runs/<name>/eval/*/results.json`` and each student's distillation metrics, and writes
``report.json``, ``report.md`` and ``report.png`` into ``report.output`` (the run folder).

``report.json`` has an entry per model (``teacher``, ``pruned_<student>``,
``distilled_<student>``) with ``params``, ``val_loss`` and ``mmlu`` (macro average, 0-1), and
``recovery`` (distilled MMLU / teacher MMLU) per student. With a single student the entries
are also under ``pruned`` and ``distilled`` and ``recovery`` is that student's number.
``gap_closed`` is the share of the pruning loss gap closed by distillation:
(pruned − distilled) / (pruned − teacher) on validation loss.

Every MMLU score carries its standard error (``mmlu_se``) and question count. A score within two
standard errors of chance (0.25, the error computed at chance) is marked ``mmlu_at_chance``.
Recovery is stated only where the teacher is clearly above chance (by more than two standard
errors); otherwise it is ``None`` and ``recovery_note`` says why it is not measurable.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipelines.core.artifacts import write_json
from pipelines.core.errors import require
from pipelines.evaluation import deploy, sweep_results
from pipelines.evaluation.recovery import corpus_statistics, markdown, mmlu_statistics, plot, search_plot, summarize
from pipelines.stages.base import Stage


def collect(run_dir: Path) -> tuple[dict, dict, dict]:
    """``(entries, per-subject accuracies, training curves)`` from a run folder."""
    entries, subjects, curves = {}, {}, {}
    for path in sorted((run_dir / "eval").glob("*/results.json")):
        result = json.loads(path.read_text())
        name = path.parent.name
        mmlu = result.get("mmlu") or {}
        entries[name] = {"params": result["params"], "val_loss": result.get("val_loss"),
                         "mmlu": mmlu.get("macro"), "mmlu_micro": mmlu.get("micro"),
                         "mmlu_questions": mmlu.get("questions"), "checkpoint": result["checkpoint"],
                         **mmlu_statistics(mmlu), **corpus_statistics(result.get("corpus"))}
        if result.get("quantization"):
            entries[name]["quantized"] = result["quantization"]
        subjects[name] = mmlu.get("subjects", {})
    for folder in sorted(run_dir.glob("distill_*")):
        metrics = folder / "train" / "metrics.jsonl"
        if metrics.exists():
            lines = [json.loads(line) for line in metrics.read_text().splitlines() if line]
            curves[folder.name[len("distill_"):]] = lines
    return entries, subjects, curves


def generations(run_dir: Path) -> tuple[dict, str]:
    """``({model: [{prompt, text}]}, the tokens the validation loss counts)`` from the run's eval results."""
    found, counted = {}, "all"
    for path in sorted((run_dir / "eval").glob("*/results.json")):
        result = json.loads(path.read_text())
        if result.get("generations"):
            found[path.parent.name] = result["generations"]
        counted = result.get("val_tokens", counted)
    return found, counted


def searches(run_dir: Path) -> dict:
    """The scored candidates of every ``prune=search`` student of the run (its prune report)."""
    found = {}
    for path in sorted(run_dir.glob("prune_*/prune_report.json")):
        pruned = json.loads(path.read_text())
        if pruned.get("candidates"):
            found[path.parent.name[len("prune_"):]] = {
                key: pruned[key] for key in ("target_params", "targets", "ranked_by", "candidates", "latency",
                                             "memory") if key in pruned}
    return found


def run(cfg, layout=None, output: Path | None = None, inputs=None) -> dict:
    """Write the report of the run's eval results into ``report.output``; returns it."""
    run_dir, output = Path(str(cfg.run.dir)), Path(str(output or cfg.report.output))

    entries, subjects, curves = collect(run_dir)
    points = sweep_results.collect(run_dir)
    require(entries or points, f"no evaluation results in {run_dir}/eval and no sweep points in {run_dir}/sweep; "
            "run the eval stage first (make eval)", "run.name")
    report = summarize(entries)
    report["searches"] = searches(run_dir)
    report["generations"], report["val_tokens"] = generations(run_dir)
    output.mkdir(parents=True, exist_ok=True)
    written = []
    if entries:
        text = markdown(report, str(cfg.run.name))
        plot(report, subjects, curves, output / "report.png", str(cfg.run.name))
        written.append(output / "report.png")
        speed_path = Path(str(cfg.eval.speed.output)) / "results.json"
        if speed_path.exists():   # the speed stage's figures, with quality beside them
            speed = json.loads(speed_path.read_text())
            quality = {n: e.get("val_loss") for n, e in entries.items()}
            report["speed"] = speed
            text += "\n".join(deploy.speed_lines(speed, quality)) + "\n"
            deploy.plot(speed, quality, output / "report_speed.png", str(cfg.run.name))
            written.append(output / "report_speed.png")
    else:
        text = f"# Recovery report: {cfg.run.name}\n\nNo model of the run itself is evaluated (make eval).\n"
    ranked = {student: found for student, found in report["searches"].items() if found.get("ranked_by")}
    if ranked:
        search_plot(ranked, output / "report_search.png")
        written.append(output / "report_search.png")
    if points:
        report["sweep"] = sweep_results.compare(points)
        text += "\n".join(sweep_results.markdown(report["sweep"])) + "\n"
        sweep_results.plot(points, output / "report_sweep.png")
        written.append(output / "report_sweep.png")
    write_json(output / "report.json", report)
    (output / "report.md").write_text(text)
    print(text)
    print("\n".join(f"[report] {path}" for path in [output / "report.md", *written]))
    return report


# Always rewritten (cheap, and it reads every model's results): no inputs, no manifest.
STAGE = Stage(name="report", output=lambda cfg: Path(str(cfg.report.output)), inputs=lambda cfg: None, run=run,
              runtime=None)
