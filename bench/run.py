"""Run the benchmarks, record each one's last line in bench/results.json, render docs/benchmarks.md.

    python bench/run.py                 # every benchmark in full (make bench); records and renders
    python bench/run.py --quick         # every benchmark's quick mode (make bench-quick, CI); records nothing
    python bench/run.py --only memory_plan fault_injection
    python bench/run.py --render        # docs/benchmarks.md from bench/results.json, nothing run

Each benchmark prints its ratios as ``key=value`` pairs on its last line. A full run records that
line with its date, its machine and its seconds, and checks it against the benchmark's goal (a
condition on those values), so the page shows the latest figure of each benchmark and whether it
meets its goal, and cannot drift from what ``make bench`` printed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results.json"
PAGE = REPO / "docs" / "benchmarks.md"


@dataclass(frozen=True)
class Benchmark:
    name: str                 # the key in results.json
    script: str               # bench/<script>.py
    args: tuple[str, ...] = ()
    goal: str | None = None   # a condition on the last line's values; None: a diagnostic, no goal
    says: str = ""            # the goal in words
    quick: bool = True        # run by --quick


BENCHMARKS = (
    Benchmark("import_memory", "import_memory", goal="peak_rss_ratio <= 1.3",
              says="import's peak RSS at most 1.3× the checkpoint"),
    Benchmark("calibration_cost", "calibration_cost", goal="calib_over_forward <= 1.3",
              says="width-pruning calibration at most 1.3× plain forward passes"),
    Benchmark("logits_cache", "logits_cache", goal="overhead <= 1.05",
              says="writing the cache at most 1.05× the teacher's forward passes"),
    Benchmark("eval_throughput", "eval_throughput", goal="eval_over_forward <= 1.2",
              says="MMLU scoring at most 1.2× its forward passes"),
    Benchmark("lm_eval_agreement", "lm_eval_agreement", goal="agreement == 1.0 and questions >= 200",
              says="the same letters as lm-evaluation-harness on at least 200 questions"),
    Benchmark("param_search", "param_search",
              goal="chosen_params <= budget and chosen_val_loss <= best_manual_val_loss",
              says="the searched student within budget and no worse than the best hand-written one"),
    Benchmark("param_search_wide", "param_search",
              ("--search-args", "prune.search.max_depth_pruning=0.5 prune.search.max_width_pruning=0.75"),
              goal="chosen_params <= budget and chosen_val_loss <= best_manual_val_loss",
              says="the same, with wider search limits", quick=False),
    Benchmark("prune_rounds", "prune_rounds", says="which wins, one round or two (no goal)"),
    Benchmark("distill_step", "distill_step",
              goal="cache_kd_over_ce_time <= 1.10 and online_over_ce_plus_teacher <= 1.05 "
                   "and cache_kd_over_ce_mem <= 1.15",
              says="a cached-KD step within 1.10× a CE step's time and 1.15× its memory; online within 1.05×"),
    Benchmark("distill_step_real", "distill_step", ("--real", "--repeats", "3"),
              goal="cache_kd_over_ce_time <= 1.10 and online_over_ce_plus_teacher <= 1.05 "
                   "and cache_kd_over_ce_mem <= 1.15",
              says="the same at SmolLM2-135M's shape", quick=False),
    Benchmark("vs_transformers", "vs_transformers",
              goal="ours_ce_over_hf_ce >= 1.0 and cachekd_over_ce >= 0.97 and cachekd_over_hf_online_kd >= 1.5",
              says="our CE step at least transformers'; cached KD within 3% of CE and 1.5× transformers' online KD"),
    Benchmark("vs_transformers_host", "vs_transformers", ("--host",),
              says="a diagnostic: the host's share of a small model's step (no goal)", quick=False),
    Benchmark("kd_vs_ce", "kd_vs_ce", goal="kd_val_loss < ce_val_loss",
              says="distillation below fine-tuning in held-out loss"),
    Benchmark("recipe_study", "recipe_study", goal="ce_val_loss - best_kd_val_loss > max(kd_sd, ce_sd)",
              says="the best KD setting below CE by more than the larger seed deviation"),
    Benchmark("student_speed", "student_speed", says="decode speed of the depth and width students at equal "
              "parameters against the teacher (no goal: which way it falls)"),
    Benchmark("quantize_cost", "quantize_cost", says="held-out loss FP8 and INT4-AWQ cost the SmolLM2 depth student, "
              "PTQ against QAD at equal student tokens (no goal: which way it falls)"),
    Benchmark("hidden_state_kd", "hidden_state_kd", ("--steps", "20"),
              says="cosine terms at a depth student's source layers against logits-only online KD and the cached "
              "default, 3 seeds of 20 steps (no goal: which way it falls)"),
    Benchmark("latency_search", "latency_search", ("--top-k", "3", "--rank-steps", "10"),
              goal="chosen_ms <= 1.05 * target_ms and "
                   "chosen_val_loss <= min(after_prune_rank_val_loss, depth_val_loss, width_val_loss)",
              says="the student searched under the depth student's decode latency meets it (5%) and, ranked by a "
              "short distillation, is no worse than the after-pruning ranking or the hand-written students"),
    Benchmark("chat_distill", "chat_distill", ("--seeds", "2", "--steps", "30"),
              says="on conversations (a conversation-shaped view of Austen), the masked cache's bytes and KD against "
              "CE-only on assistant tokens at equal tokens, and KD trained with attention crossing between packed "
              "conversations, 2 seeds of 30 steps (no goal: which way it falls)"),
    Benchmark("memory_plan", "memory_plan", goal="plan_max_rel_error <= 0.15 and worst_8b_stage_gb < 80",
              says="the memory plan within 15% of measured peaks; every 8B stage below 80 GB"),
    Benchmark("time_plan", "time_plan", goal="distill_mfu >= 0.50",
              says="the shipped 8B distill layout predicted at MFU 0.50 or more on H100 (memory margin 10%: "
              "starred in its table)"),
    Benchmark("fault_injection", "fault_injection",
              goal="kills >= 20 and identical == True and replace_kills >= 5 and concurrent == 'refused'",
              says="at least 20 kills and 5 inside a replace, every artifact identical; a second run refused"),
)


def parse(line: str) -> dict:
    """``a=1.5 b=true c=x`` -> ``{"a": 1.5, "b": True, "c": "x"}``."""
    values = {}
    for key, value in re.findall(r"([A-Za-z_][\w]*)=(\S+)", line):
        if value in ("true", "false"):
            values[key] = value == "true"
            continue
        try:
            values[key] = int(value)
        except ValueError:
            try:
                values[key] = float(value)
            except ValueError:
                values[key] = value
    return values


def meets(goal: str | None, values: dict) -> bool | None:
    """Whether ``values`` meet ``goal`` (None: no goal, or the line lacks a value it names)."""
    if goal is None:
        return None
    try:
        return bool(eval(goal, {"__builtins__": {"max": max, "min": min, "abs": abs, "True": True}}, dict(values)))
    except (NameError, TypeError):
        return None


def machine() -> str:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()} CPU cores ({platform.machine()}), {gpu}, torch {torch.__version__}"


def run(benchmark: Benchmark, quick: bool) -> tuple[int, str, float]:
    """Run one benchmark, its output streamed; returns (exit status, last line, seconds)."""
    command = [sys.executable, str(REPO / "bench" / f"{benchmark.script}.py"), *benchmark.args,
               *(["--quick"] if quick else [])]
    print(f"== {' '.join(['bench/' + benchmark.script + '.py', *benchmark.args, *(['--quick'] if quick else [])])}",
          flush=True)
    started = time.time()
    lines = []
    with subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as process:
        for line in process.stdout:
            lines.append(line.rstrip("\n"))
            if not quick:
                print(line, end="", flush=True)
    seconds = time.time() - started
    last = next((line for line in reversed(lines) if line.strip()), "")
    if quick:   # CI's log: the last lines that are not warnings
        print("\n".join([line for line in lines if "warn" not in line.lower()][-4:]))
    if process.returncode:
        print("\n".join(lines[-40:]))
    print(f"({seconds:.0f} s)", flush=True)
    return process.returncode, last, seconds


def load() -> dict:
    return json.loads(RESULTS.read_text()) if RESULTS.exists() else {}


def render(results: dict) -> str:
    """docs/benchmarks.md: one row per benchmark, its latest recorded line, its goal, date and machine."""
    rows = ["# Benchmarks", "",
            "Rendered by `bench/run.py` from `bench/results.json`; `make bench` runs every benchmark in full,",
            "records its last line and renders this page again. Do not edit it by hand. Each figure is the",
            "latest full run of its benchmark, on the machine named; studies and one-off runs are dated",
            "reports under [reports/](reports/).", "",
            "| benchmark | latest last line | goal | meets | date | machine |", "|---|---|---|---|---|---|"]
    for benchmark in BENCHMARKS:
        entry = results.get(benchmark.name)
        command = " ".join([f"`bench/{benchmark.script}.py`", *(f"`{a}`" for a in benchmark.args)])
        goal = benchmark.says + (f" (`{benchmark.goal}`)" if benchmark.goal else "")
        if entry is None:
            rows.append(f"| {command} | not recorded yet | {goal} | – | – | – |")
            continue
        met = meets(benchmark.goal, parse(entry["line"]))
        verdict = {True: "met", False: "**missed**", None: "–"}[met]
        date = entry["date"] + ("†" if entry.get("recorded") == "by hand" else "")
        rows.append(f"| {command} | `{entry['line']}` | {goal} | {verdict} | {date} | {entry['machine']} |")
    if any(entry.get("recorded") == "by hand" for entry in results.values()):
        rows += ["", "† Recorded by hand from the README's table before `bench/results.json` existed (its runs:",
                 "[reports/2026-12-03-benchmark-history.md](reports/2026-12-03-benchmark-history.md)); the next",
                 "full run of that benchmark replaces it."]
    notes = [f"- `{name}`: {entry['note']}" for name, entry in results.items() if entry.get("note")]
    if notes:
        rows += ["", "Notes on the recorded figures:", "", *notes]
    return "\n".join(rows) + "\n"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="each benchmark's quick mode; records nothing")
    parser.add_argument("--only", nargs="+", help="these benchmarks (names as in results.json)")
    parser.add_argument("--render", action="store_true", help="render docs/benchmarks.md only")
    args = parser.parse_args(argv)
    if args.render:
        PAGE.write_text(render(load()))
        return 0
    names = {b.name for b in BENCHMARKS}
    unknown = sorted(set(args.only or ()) - names)
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; one of {', '.join(sorted(names))}")
    chosen = [b for b in BENCHMARKS if (args.only is None or b.name in args.only) and (b.quick or not args.quick)]
    failed = []
    for benchmark in chosen:
        status, last, seconds = run(benchmark, args.quick)
        if status or "=" not in last:
            failed.append(f"bench/{benchmark.script}.py {'exited ' + str(status) if status else 'printed no ratio line'}")
            print(failed[-1], flush=True)
            continue
        if not args.quick:
            results = load()
            results[benchmark.name] = {"line": last, "date": time.strftime("%Y-%m-%d"), "machine": machine(),
                                       "seconds": round(seconds), "recorded": "make bench"}
            RESULTS.write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")
            PAGE.write_text(render(results))
    if failed:
        print("failed: " + "; ".join(failed), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
