"""What a student buys when served: the speed stage's figures in the report, and quality against them.

:func:`speed_lines` tables each model's decode and prefill throughput, time to first token and
memory with its ratio to the teacher; :func:`pareto` marks the models no other model beats on
both quality and speed (or memory); :func:`plot` draws held-out loss against decode tokens/s and
against memory with that front.
"""

from __future__ import annotations

from pathlib import Path


def _median(entry: dict, key: str):
    figures = entry.get("speed") or {}
    return (figures.get(key) or {}).get("median")


def _spread(entry: dict, key: str, pattern: str) -> str:
    figures = (entry.get("speed") or {}).get(key)
    if not figures:
        return "–"
    return f"{format(figures['median'], pattern)} ({format(figures['min'], pattern)}–{format(figures['max'], pattern)})"


def pareto(points: dict[str, tuple[float, float]]) -> set[str]:
    """Names whose ``(cost, loss)`` no other point beats on both (lower is better on each)."""
    front = set()
    for name, (cost, loss) in points.items():
        if not any((c <= cost and l <= loss) and (c < cost or l < loss) for other, (c, l) in points.items()
                   if other != name):
            front.add(name)
    return front


def summaries(speed: dict) -> list[str]:
    """One measured sentence per student: how many times faster and smaller than the teacher."""
    models = speed["models"]
    teacher = models.get("teacher")
    if not teacher or not teacher.get("speed"):
        return []
    base, wide = _median(teacher, "decode_tokens_per_s_batch1"), f"decode_tokens_per_s_batch{speed['batch']}"
    lines = []
    for name, entry in models.items():
        if name == "teacher":
            continue
        memory = entry["memory_bytes"] / teacher["memory_bytes"]
        weights = entry["weight_bytes"] / teacher["weight_bytes"]
        if entry.get("speed"):
            lines.append(f"- **{name}**: {_median(entry, 'decode_tokens_per_s_batch1') / base:.2f}x the teacher's "
                         f"decode tokens/s at batch 1, {_median(entry, wide) / _median(teacher, wide):.2f}x at batch "
                         f"{speed['batch']}; {weights:.2f}x its weight bytes and {memory:.2f}x its memory at "
                         f"{speed['context']} tokens x {speed['batch']}.")
        else:
            lines.append(f"- **{name}**: {weights:.2f}x the teacher's weight bytes, {memory:.2f}x its memory; "
                         f"speed {entry['speed_note']}.")
    return lines


def speed_lines(speed: dict, quality: dict) -> list[str]:
    """The speed and memory section of the report (``speed``: the speed stage's results.json)."""
    models, batch = speed["models"], speed["batch"]
    teacher = models.get("teacher") or {}
    base = _median(teacher, "decode_tokens_per_s_batch1")
    lines = ["", "## Speed and memory (make eval: the speed stage)", "",
             f"Measured on {speed['device']} ({speed['compute_dtype']}) with transformers (SDPA, greedy; decode as KV-cache steps): "
             f"prompt {speed['prompt_length']} tokens, {speed['decode_tokens']} new tokens, median (min–max) of "
             f"{speed['repeats']} repeats, models alternating. Memory: weights plus KV cache at {speed['context']} "
             f"tokens x {batch} sequences, in {speed['memory_dtype']}. A pruned student has its distilled "
             "student's shape and speed.", "",
             f"| model | decode tok/s, batch 1 | × teacher | decode tok/s, batch {batch} | prefill tok/s "
             "| first token (ms) | memory | × teacher |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, entry in sorted(models.items(), key=lambda item: (item[0] != "teacher", item[0])):
        decode = _median(entry, "decode_tokens_per_s_batch1")
        ratio = f"{decode / base:.2f}x" if decode and base else "–"
        ttft = (entry.get("speed") or {}).get("ttft_s")
        memory = entry["memory_bytes"] / teacher["memory_bytes"] if teacher else None
        if entry.get("speed"):
            cells = [_spread(entry, "decode_tokens_per_s_batch1", ".1f"), ratio,
                     _spread(entry, f"decode_tokens_per_s_batch{batch}", ".1f"),
                     _spread(entry, "prefill_tokens_per_s", ".0f"), f"{ttft['median'] * 1e3:.1f}"]
        else:
            cells = ["not measurable on this device", "–", "–", "–", "–"]
        lines.append(f"| {name} | {' | '.join(cells)} | {entry['memory_bytes'] / 1e6:,.1f} MB | "
                     f"{'–' if memory is None else f'{memory:.2f}x'} |")
    lines += ["", *summaries(speed)]
    timed = {n: (1 / _median(e, "decode_tokens_per_s_batch1"), quality[n]) for n, e in models.items()
             if e.get("speed") and quality.get(n) is not None}
    sized = {n: (e["memory_bytes"], quality[n]) for n, e in models.items() if quality.get(n) is not None}
    if timed:
        lines += ["", "On the Pareto front of validation loss against decode time (no model both faster and better): "
                  + ", ".join(sorted(pareto(timed))) + "; against memory: " + ", ".join(sorted(pareto(sized))) + "."]
    return lines


def plot(speed: dict, quality: dict, path: Path, name: str) -> None:
    """Validation loss against decode tokens/s (batch 1) and against memory, the fronts marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = speed["models"]
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    panels = ((axes[0], {n: _median(e, "decode_tokens_per_s_batch1") for n, e in models.items() if e.get("speed")},
               "decode tokens/s, batch 1 (higher is better)", lambda x: 1 / x),
              (axes[1], {n: e["memory_bytes"] / 1e6 for n, e in models.items()},
               f"memory at {speed['context']} tokens x {speed['batch']} (MB, lower is better)", lambda x: x))
    for axis, xs, label, cost in panels:
        points = {n: (x, quality[n]) for n, x in xs.items() if x and quality.get(n) is not None}
        front = pareto({n: (cost(x), q) for n, (x, q) in points.items()})
        for n, (x, q) in points.items():
            axis.scatter([x], [q], color="#d62728" if n in front else "#1f77b4", zorder=3)
            axis.annotate(n, (x, q), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ordered = sorted((points[n] for n in front), key=lambda p: p[0])
        if len(ordered) > 1:
            axis.plot(*zip(*ordered), color="#d62728", linestyle="--", linewidth=1, label="Pareto front")
            axis.legend(fontsize=8)
        axis.set_xlabel(label)
        axis.set_ylabel("validation loss (lower is better)")
        axis.grid(alpha=0.3)
    figure.suptitle(f"{name}: quality against speed and memory")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
