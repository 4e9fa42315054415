"""Recovery statistics and the report's rendering: tables, notes and the plot.

Every MMLU score carries its standard error and question count. A score within two standard
errors of chance (0.25) is marked at chance, and recovery (distilled over teacher) is stated
only where the teacher is clearly above chance. The report stage (:mod:`pipelines.stages.report`)
collects the run's results and calls these.
"""

from __future__ import annotations

import re
from pathlib import Path

from pipelines.evaluation.corpus_task import CHANCE, at_chance


def _ratio(numerator, denominator):
    return numerator / denominator if numerator is not None and denominator else None


def macro_standard_error(accuracy: float, counts: list[int]) -> float | None:
    """Standard error of a macro average (the mean over subjects of per-subject accuracies) when
    every question is right with probability ``accuracy``: sqrt(p(1 − p) · Σ 1/n_s) / S."""
    if not counts:
        return None
    return (accuracy * (1 - accuracy) * sum(1 / n for n in counts)) ** 0.5 / len(counts)


def mmlu_statistics(mmlu: dict) -> dict:
    """Standard error and the at-chance mark of one model's MMLU summary (``pipelines.evaluation.mmlu``)."""
    if not mmlu:
        return {"mmlu_se": None, "mmlu_chance_se": None, "mmlu_at_chance": None}
    counts = list((mmlu.get("counts") or {}).values())
    if not counts and mmlu.get("subjects"):  # results written before per-subject counts
        counts = [mmlu["questions"] / len(mmlu["subjects"])] * len(mmlu["subjects"])
    # the spread at the observed micro accuracy (per-subject accuracies of 0 or 1 on a few
    # questions would claim no spread), and the spread a guesser would have, for the chance test
    se = macro_standard_error(mmlu.get("micro", mmlu["macro"]), counts)
    at_chance_se = macro_standard_error(CHANCE, counts)
    return {"mmlu_se": se, "mmlu_chance_se": at_chance_se, "mmlu_at_chance": at_chance(mmlu["macro"], at_chance_se)}


def corpus_statistics(corpus: dict | None) -> dict:
    """The corpus task's score, error and at-chance mark (:func:`pipelines.evaluation.corpus_task.summarize`)."""
    corpus = corpus or {}
    return {"corpus": corpus.get("accuracy"), "corpus_se": corpus.get("se"),
            "corpus_chance_se": corpus.get("chance_se"), "corpus_at_chance": corpus.get("at_chance"),
            "corpus_questions": corpus.get("questions")}


def ranked_table(student: str, found: dict) -> list[str]:
    """A search by deployment targets (:mod:`pipelines.stages.candidates`): every candidate's shape,
    size, latency, memory and losses, the chosen one marked."""
    targets, rows = found["targets"], found["candidates"]
    wanted = [f"at most {targets['params']:,} parameters" if targets.get("params") else None,
              f"decode in at most {targets['latency_ms']} ms" if targets.get("latency_ms") is not None else None,
              f"at most {targets['memory_gb']} GB" if targets.get("memory_gb") is not None else None]
    latency = found.get("latency")
    steps = next((r["distill_tokens"] for r in rows if "distill_tokens" in r), None)
    lines = ["", f"## Search: {student} ({', '.join(w for w in wanted if w)}; ranked by "
             f"{'the loss after a short distillation' if found['ranked_by'] == 'val_loss_distilled' else 'the loss after pruning'})",
             ""]
    if latency:
        lines.append(f"Latency: ms per decode step at batch {latency['settings']['batch']} after "
                     f"{latency['settings']['context']} tokens on {latency['device']}, "
                     + ("each shape timed whole." if latency["method"] == "whole" else
                        f"modelled from per-layer timings (largest error on {len(latency['check'])} whole-model "
                        f"timings: {100 * latency['max_error']:.1f}%)."))
    memory = found.get("memory") or {}
    lines.append(f"Memory: weights in {memory.get('format')} plus the KV cache at {memory.get('context')} tokens x "
                 f"{memory.get('batch')}." + (f" Short distillation: {steps:,} tokens per candidate." if steps else ""))
    lines += ["", "| layers | hidden | MLP | heads | parameters | latency ms | memory GB | loss after pruning | "
              "loss after short KD | |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for row in rows:
        shape = row["architecture"]
        mark = "chosen" if row["chosen"] else ("best after pruning" if row.get("chosen_after_pruning") else "")
        lines.append(f"| {shape['num_layers']} | {shape['hidden_size']} | {shape['ffn_hidden_size']} | "
                     f"{shape['num_attention_heads']} | {row['params']:,} | {_fmt(row.get('latency_ms'), '.3f')} | "
                     f"{row['memory_bytes'] / 1e9:.3f} | {row['val_loss_pruned']:.4f} | "
                     f"{_fmt(row.get('val_loss_distilled'), '.4f')} | {mark} |")
    return lines


def search_plot(searches: dict, path) -> None:
    """Loss against latency (or parameters, without a latency target) of every ranked search's candidates."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(searches), figsize=(6 * len(searches), 4), squeeze=False)
    for axis, (student, found) in zip(axes[0], searches.items()):
        rows = found["candidates"]
        timed = all(r.get("latency_ms") is not None for r in rows)
        xs = [r["latency_ms"] if timed else r["params"] / 1e6 for r in rows]
        axis.scatter(xs, [r["val_loss_pruned"] for r in rows], marker="x", label="after pruning")
        if any("val_loss_distilled" in r for r in rows):
            axis.scatter(xs, [r.get("val_loss_distilled") for r in rows], marker="o", label="after short KD")
        for x, row in zip(xs, rows):
            if row["chosen"]:
                axis.annotate("chosen", (x, row.get("val_loss_distilled", row["val_loss_pruned"])))
        if timed and found["targets"].get("latency_ms") is not None:
            axis.axvline(float(found["targets"]["latency_ms"]), linestyle="--", color="grey", label="target")
        axis.set_xlabel("ms per decode step" if timed else "parameters (M)")
        axis.set_ylabel("held-out loss")
        axis.set_title(f"search: {student}")
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def search_table(student: str, found: dict) -> list[str]:
    if found.get("ranked_by"):
        return ranked_table(student, found)
    score = found["candidates"][0]["score"]   # val_loss | mmlu, the key of each row's value
    lines = ["", f"## Search: {student} (at most {found['target_params']:,} parameters, {score})", "",
             f"| layers | hidden | MLP | heads | parameters | {score} | |", "|---:|---:|---:|---:|---:|---:|---|"]
    for row in found["candidates"]:
        shape = row["architecture"]
        lines.append(f"| {shape['num_layers']} | {shape['hidden_size']} | {shape['ffn_hidden_size']} | "
                     f"{shape['num_attention_heads']} | {row['params']:,} | {_fmt(row.get(score), '.4f')} | "
                     f"{'chosen' if row['chosen'] else ('not exportable' if not row['exportable'] else '')} |")
    return lines


def _student_order(name: str) -> tuple:
    """Students in order, the rounds of one numerically (``s_r2`` before ``s_r10``)."""
    found = re.fullmatch(r"(.+)_r(\d+)", name)
    return (found.group(1), int(found.group(2))) if found else (name, 0)


def rounds_of(students: list[str]) -> dict[str, list[str]]:
    """``{student: [student_r1, student_r2, ...]}`` for the students pruned in rounds (``run.rounds``)."""
    chains: dict[str, list[str]] = {}
    for name in students:
        base, number = _student_order(name)
        if number:
            chains.setdefault(base, []).append(name)
    return chains


def rounds_table(base: str, chain: list[str], report: dict) -> list[str]:
    teacher = report.get("teacher") or {}
    lines = ["", f"## Rounds: {base} (each round prunes the previous round's distilled student)", "",
             "| round | parameters | share of the teacher | val loss pruned | val loss distilled | corpus task distilled |",
             "|---:|---:|---:|---:|---:|---:|"]
    for name in chain:
        pruned, distilled = report.get(f"pruned_{name}") or {}, report.get(f"distilled_{name}") or {}
        params = (distilled or pruned).get("params")
        share = _ratio(params, teacher.get("params"))
        lines.append(f"| {_student_order(name)[1]} | {_fmt(params and params / 1e6, ',.3f')} M | {_fmt(share, '.1%')} | "
                     f"{_fmt(pruned.get('val_loss'), '.4f')} | {_fmt(distilled.get('val_loss'), '.4f')} | "
                     f"{_fmt(distilled.get('corpus'), '.3f')} |")
    return lines


def summarize(entries: dict) -> dict:
    students = sorted({name.split("_", 1)[1] for name, entry in entries.items()
                       if name.startswith(("pruned_", "distilled_")) and not entry.get("quantized")},
                      key=_student_order)
    teacher = entries.get("teacher", {})
    report = dict(entries)
    recovery, recovery_se, gap_closed = {}, {}, {}
    corpus, corpus_se = {}, {}
    note, corpus_note = recovery_note(teacher, "mmlu"), recovery_note(teacher, "corpus")
    for student in students:
        pruned, distilled = entries.get(f"pruned_{student}", {}), entries.get(f"distilled_{student}", {})
        recovery[student], recovery_se[student] = _recovery(distilled, teacher, "mmlu", note)
        corpus[student], corpus_se[student] = _recovery(distilled, teacher, "corpus", corpus_note)
        if None not in (pruned.get("val_loss"), distilled.get("val_loss"), teacher.get("val_loss")):
            gap_closed[student] = _ratio(pruned["val_loss"] - distilled["val_loss"],
                                         pruned["val_loss"] - teacher["val_loss"])
    report["students"] = students
    report["recovery_note"], report["corpus_recovery_note"] = note, corpus_note
    if len(students) == 1:
        only = students[0]
        report["pruned"] = entries.get(f"pruned_{only}")
        report["distilled"] = entries.get(f"distilled_{only}")
        report["recovery"], report["gap_closed"] = recovery.get(only), gap_closed.get(only)
        report["recovery_se"] = recovery_se.get(only)
        report["corpus_recovery"], report["corpus_recovery_se"] = corpus.get(only), corpus_se.get(only)
    else:
        report["recovery"], report["gap_closed"], report["recovery_se"] = recovery, gap_closed, recovery_se
        report["corpus_recovery"], report["corpus_recovery_se"] = corpus, corpus_se
    return report


METRICS = {"mmlu": "MMLU", "corpus": "corpus-task"}


def recovery_note(teacher: dict, metric: str = "mmlu") -> str | None:
    """Why recovery on ``metric`` (``mmlu``, ``corpus``) cannot be measured (``None`` when it can):
    no teacher score, or a teacher not clearly above chance, where a ratio to it is noise."""
    if teacher.get(metric) is None:
        return f"not measurable: the teacher has no {METRICS[metric]} score"
    chance_se = teacher.get(f"{metric}_chance_se")
    if chance_se is None or teacher[metric] <= CHANCE + 2 * chance_se:
        return (f"not measurable at this size: the teacher scores {teacher[metric]:.4f} ± "
                f"{teacher.get(f'{metric}_se') or 0:.4f} on {teacher[f'{metric}_questions']} {METRICS[metric]} "
                f"questions, not clearly above chance ({CHANCE}, two standard errors); a ratio to it would say "
                "nothing")
    return None


def _recovery(distilled: dict, teacher: dict, metric: str, note: str | None) -> tuple:
    """``(distilled / teacher, its standard error)`` on ``metric``, or ``(None, None)`` with a ``note``.

    The error is the delta method's, the two scores taken as independent (on the same questions
    they are correlated, which makes it conservative)."""
    d, t = distilled.get(metric), teacher.get(metric)
    if note is not None or d is None or not t:
        return None, None
    d_se, t_se = distilled.get(f"{metric}_se"), teacher.get(f"{metric}_se")
    if d_se is None or t_se is None or not d:
        return d / t, None
    return d / t, d / t * ((d_se / d) ** 2 + (t_se / t) ** 2) ** 0.5


def _fmt(value, pattern):
    return "–" if value is None else format(value, pattern)


def quantized_of(report: dict, student: str) -> list[str]:
    """The entries of ``student``'s quantized exports, by format."""
    return sorted(name for name, entry in report.items()
                  if isinstance(entry, dict) and (entry.get("quantized") or {}).get("student") == student)


def quantization_lines(report: dict) -> list[str]:
    """Each quantized export beside its unquantized student: bytes, and what quantization cost."""
    rows = []
    for student in report["students"]:
        base = report.get(f"distilled_{student}") or {}
        for name in quantized_of(report, student):
            entry, q = report[name], report[name]["quantized"]
            loss = entry.get("val_loss")
            delta = _fmt(None if None in (loss, base.get("val_loss")) else loss - base["val_loss"], "+.4f")
            corpus = _fmt(None if None in (entry.get("corpus"), base.get("corpus")) else
                          entry["corpus"] - base["corpus"], "+.4f")
            group = f", groups of {q['group_size']}" if q.get("group_size") else ""
            rows.append(f"| {name} | {q['quant_algo']}{group}, {q.get('method', 'PTQ')} | {q['bytes'] / 1e6:,.2f} MB | {delta} | {corpus} "
                        f"| {q['export_logit_drift']:.1e} |")
    if not rows:
        return []
    return ["", "## Quantized students (make quantize)", "",
            "Each is ModelOpt's unified Hugging Face export (vLLM, TensorRT-LLM and SGLang load it), scored "
            "fake-quantized from its own files. Weight bytes are the safetensors files; the last column is how "
            "far the export read back is from the calibrated fake-quantized model (mean |Δ logit|). PTQ: the "
            "distilled student quantized after training; QAD: a student distilled fake-quantized in that "
            "format (distill.quantize), then quantized the same way.", "",
            "| model | format | weights | Δ validation loss | Δ corpus task | export check |",
            "|---|---|---:|---:|---:|---:|", *rows]


def markdown(report: dict, name: str) -> str:
    teacher = report.get("teacher", {})
    counted = " (assistant tokens)" if report.get("val_tokens") == "assistant" else ""
    lines = [f"# Recovery report: {name}", "",
             "| model | parameters | MMLU (macro) ± s.e. | MMLU / teacher | corpus task ± s.e. | corpus / teacher "
             f"| validation loss{counted} |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    order = ["teacher"] + [m for s in report["students"] for m in (f"pruned_{s}", f"distilled_{s}",
                                                                    *quantized_of(report, s))]
    notes = {"mmlu": report.get("recovery_note"), "corpus": report.get("corpus_recovery_note")}
    for model in order:
        entry = report.get(model)
        if not entry:
            continue
        cells = []
        for metric in ("mmlu", "corpus"):
            score = _fmt(entry.get(metric), ".4f")
            if entry.get(f"{metric}_se") is not None:
                score += f" ± {entry[f'{metric}_se']:.4f}" + (" (at chance)" if entry.get(f"{metric}_at_chance") else "")
            share = _fmt(_ratio(entry.get(metric), teacher.get(metric)), ".1%") if notes[metric] is None else "–"
            cells += [score, share]
        lines.append(f"| {model} | {entry['params'] / 1e6:,.2f} M | {' | '.join(cells)} | {_fmt(entry['val_loss'], '.4f')} |")
    first = report["students"][0] if report["students"] else None

    def per_student(key):
        value = report.get(key)
        return (value if isinstance(value, dict) else {first: value}) if value is not None else {}

    gap = per_student("gap_closed")
    lines.append("")
    for student in report["students"]:
        stated = []
        for metric, key in (("mmlu", "recovery"), ("corpus", "corpus_recovery")):
            if notes[metric] is None and per_student(key).get(student) is not None:
                text = f"{METRICS[metric]} recovery {per_student(key)[student]:.1%}"
                if per_student(f"{key}_se").get(student) is not None:
                    text += f" ± {per_student(f'{key}_se')[student]:.1%}"
                stated.append(text)
            else:
                stated.append(f"{METRICS[metric]} recovery not measurable (below)")
        lines.append(f"- **{student}**: {'; '.join(stated)}; distillation closed {_fmt(gap.get(student), '.1%')} "
                     "of the validation-loss gap that pruning opened.")
    for metric, note in notes.items():
        if note is not None:
            lines += ["", f"{METRICS[metric][0].upper() + METRICS[metric][1:]} recovery is {note}."]
    questions = teacher.get("mmlu_questions")
    if questions:
        lines += ["", f"MMLU over {questions} questions per model (± one standard error; \"at chance\": within two "
                  f"standard errors of {CHANCE}); see eval/*/results.json for per-subject accuracy, and "
                  "report.png for the picture."]
        weighted = [f"{m} {report[m]['mmlu_micro']:.4f}" for m in order
                    if report.get(m) and report[m].get("mmlu_micro") is not None]
        lines += ["", "The MMLU column is the macro average (the mean over subjects, as the original MMLU code). "
                  "Published numbers (lm-evaluation-harness's `mmlu` group, Llama-3.1-Minitron's 65.3) weight "
                  "subjects by size; that score here: " + ", ".join(weighted) + "."]
    for base, chain in rounds_of(report["students"]).items():
        lines += rounds_table(base, chain, report)
    lines += quantization_lines(report)
    for student, found in (report.get("searches") or {}).items():
        lines += search_table(student, found)
    lines += generation_lines(report.get("generations") or {})
    return "\n".join(lines) + "\n"


def empty_answer(row: dict) -> str:
    """What an answer with no visible text was."""
    if row.get("tokens") == 0:
        return "(none: its first token is end-of-text)"
    return "(only whitespace or special tokens)"


def generation_lines(found: dict) -> list[str]:
    """Every model's greedy answer to each ``eval.generate`` prompt, side by side."""
    if not found:
        return []
    lines = ["", "## Generations", "", "Greedy, for the same prompts (`eval.generate`)."]
    prompts = list(dict.fromkeys(row["prompt"] for rows in found.values() for row in rows))
    for prompt in prompts:
        lines += ["", f"**{prompt}**", ""]
        for model, rows in found.items():
            row = next((r for r in rows if r["prompt"] == prompt), None)
            if row is not None:
                lines.append(f"- *{model}*: {' '.join(row['text'].split()) or empty_answer(row)}")
    return lines


def plot(report: dict, subjects: dict, curves: dict, path: Path, name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [m for m in ["teacher"] + [f"{k}_{s}" for s in report["students"] for k in ("pruned", "distilled")]
              if report.get(m)]
    colors = {"teacher": "#444444"}
    palette = ["#d62728", "#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b"]
    for index, student in enumerate(report["students"]):
        colors[f"pruned_{student}"] = palette[(2 * index) % len(palette)]
        colors[f"distilled_{student}"] = palette[(2 * index + 1) % len(palette)]
    names = sorted(set().union(*(subjects.get(m, {}).keys() for m in models)))
    figure = plt.figure(figsize=(15, max(8, 0.2 * len(names) + 2)))
    grid = figure.add_gridspec(3, 2, width_ratios=[1.1, 1])
    ax = figure.add_subplot(grid[:, 0])
    for offset, model in enumerate(models):
        values = [subjects.get(model, {}).get(s) for s in names]
        ys = [i + (offset - len(models) / 2) * 0.12 for i in range(len(names))]
        ax.scatter([v if v is not None else float("nan") for v in values], ys, s=14,
                   color=colors[model], label=model)
    ax.axvline(CHANCE, color="grey", linestyle=":", linewidth=1)
    ax.set_yticks(range(len(names)), [s.replace("_", " ") for s in names], fontsize=7)
    ax.set_xlabel("MMLU accuracy per subject (dotted: chance, 0.25)")
    ax.set_xlim(0, 1)
    ax.invert_yaxis()
    ax.legend(loc="lower right", fontsize=8)
    ax = figure.add_subplot(grid[0, 1])
    xs = range(len(models))
    tops = [0.3]
    for metric, offset, hatch in (("mmlu", -0.2, None), ("corpus", 0.2, "//")):
        values = [report[m].get(metric) or 0 for m in models]
        errors = [2 * (report[m].get(f"{metric}_se") or 0) for m in models]
        ax.bar([x + offset for x in xs], values, width=0.38, yerr=errors, capsize=3, hatch=hatch,
               color=[colors[m] for m in models], edgecolor="white", label=f"{METRICS[metric]} (± 2 s.e.)")
        for x, value, error in zip(xs, values, errors):
            if value:
                ax.text(x + offset, value + error + 0.01, f"{value:.3f}", ha="center", va="bottom", fontsize=7)
        tops += [v + e + 0.1 for v, e in zip(values, errors)]
    ax.axhline(CHANCE, color="grey", linestyle=":", linewidth=1)
    ax.set_xticks(list(xs), [f"{m}\n{report[m]['params'] / 1e6:.2f}M" for m in models], rotation=20, fontsize=8)
    ax.set_ylabel("accuracy (dotted: chance)")
    ax.set_ylim(0, max(tops))
    ax.legend(fontsize=7, loc="upper right")
    parts = []
    for metric, key, note in (("mmlu", "recovery", report.get("recovery_note")),
                              ("corpus", "corpus_recovery", report.get("corpus_recovery_note"))):
        values = report.get(key)
        values = values if isinstance(values, dict) else {report["students"][0]: values}
        parts.append(f"{METRICS[metric]} not measurable (teacher not clearly above chance)" if note is not None else
                     f"{METRICS[metric]} " + ", ".join(f"{s} {_fmt(v, '.1%')}" for s, v in values.items()))
    ax.set_title("Recovery (distilled / teacher)\n" + "\n".join(parts), fontsize=9)
    ax = figure.add_subplot(grid[1, 1])
    losses = [report[m]["val_loss"] or 0 for m in models]
    ax.bar(xs, losses, color=[colors[m] for m in models])
    for x, value in zip(xs, losses):
        ax.text(x, value, f"{value:.3f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(xs), models, rotation=20, fontsize=8)
    ax.set_ylim(min(losses) * 0.9, max(losses) * 1.04)
    ax.set_ylabel("validation LM loss (lower is better)")
    gap = report["gap_closed"]
    gap = gap if isinstance(gap, dict) else {report["students"][0]: gap}
    ax.set_title("Share of the pruning loss gap closed by distillation: " +
                 ", ".join(f"{s} {_fmt(v, '.1%')}" for s, v in gap.items()), fontsize=10)
    ax = figure.add_subplot(grid[2, 1])
    kd_axis = ax.twinx()
    teacher_loss = report.get("teacher", {}).get("val_loss")
    for student, lines in curves.items():
        train = [(x["step"], x["loss"]) for x in lines if x["kind"] == "train"]
        evals = [(x["step"], x["val_loss"]) for x in lines if x["kind"] == "eval" and "val_loss" in x]
        color = colors.get(f"distilled_{student}", None)
        if evals:
            ax.plot(*zip(*evals), color=color, marker="o", label=f"{student}: validation LM loss")
        if train:
            kd_axis.plot(*zip(*train), color=color, alpha=0.35, linewidth=1, label=f"{student}: training loss")
    if teacher_loss is not None:
        ax.axhline(teacher_loss, color=colors["teacher"], linestyle="--", label="teacher validation loss")
    ax.set_xlabel("distillation step")
    ax.set_ylabel("validation LM loss (markers)")
    kd_axis.set_ylabel("training loss, KD + CE mix (faint)")
    ax.set_title("Distillation curves", fontsize=10)
    handles = ax.get_legend_handles_labels()
    extra = kd_axis.get_legend_handles_labels()
    ax.legend(handles[0] + extra[0], handles[1] + extra[1], fontsize=7)
    figure.suptitle(f"{name}: prune, then distill", fontsize=13)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
