"""Distillation against plain fine-tuning at an equal token budget, on the demo students.

    .venv/bin/python bench/kd_vs_ce.py [--run runs/demo] [--students depth width]
    .venv/bin/python bench/kd_vs_ce.py --quick     # the depth student, 20 steps (CI)

Needs a finished demo run (``make demo``): its pruned students, cached teacher logits and data.
For each student it trains twice from the same pruned checkpoint with the demo's distill
settings (steps, batch, learning-rate schedule), once with KD from the cache (``kd_weight=1``)
and once with CE on the real tokens only (``teacher=none``, ``kd_weight=0``), and compares the
validation LM loss. Both train in a fresh temporary folder under the run, removed afterwards, so
a rerun after a code change never reprints an earlier result. Last line:
``kd_val_loss=<x> ce_val_loss=<x>`` for the depth-pruned student.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def train(student: str, mode: str, output: Path, extra: list[str]) -> list[dict]:
    overrides = ["experiment=demo", f"prune={student}", f"distill.output={output}", "distill.log_interval=1000"]
    overrides += ["distill.teacher=none", "distill.kd_weight=0"] if mode == "ce" else ["distill.kd_weight=1"]
    result = subprocess.run([sys.executable, "scripts/distill.py", *overrides, *extra], cwd=REPO,
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{student}/{mode} failed:\n{result.stderr[-3000:]}")
    lines = [json.loads(x) for x in (output / "train" / "metrics.jsonl").read_text().splitlines()]
    return [x for x in lines if x["kind"] == "eval"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/demo")
    parser.add_argument("--students", nargs="+", default=["depth", "width"])
    parser.add_argument("--quick", action="store_true", help="the depth student, 20 steps (CI)")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for both runs")
    args = parser.parse_args()
    run = Path(args.run)
    if not (run / "logits" / "manifest.json").exists():
        raise SystemExit(f"no finished demo run in {run}: run `make demo` first")
    if args.quick:
        args.students = ["depth"]
        args.overrides = ["distill.train_steps=20", "distill.eval_interval=10", *args.overrides]
    final = {}
    for student in args.students:
        with tempfile.TemporaryDirectory(prefix="bench_kd_vs_ce-", dir=run) as fresh:
            curves = {mode: train(student, mode, Path(fresh) / f"{student}_{mode}", args.overrides)
                      for mode in ("kd", "ce")}
        print(f"\n{student}-pruned student, validation LM loss by step (equal tokens per step):")
        print(f"{'step':>6} {'KD (kd_weight=1)':>17} {'CE only':>9}")
        for kd, ce in zip(curves["kd"], curves["ce"]):
            print(f"{kd['step']:>6} {kd['val_loss']:17.4f} {ce['val_loss']:9.4f}")
        final[student] = (curves["kd"][-1]["val_loss"], curves["ce"][-1]["val_loss"])
        winner = "KD" if final[student][0] < final[student][1] else "CE"
        print(f"{student}: {winner} ends lower (KD {final[student][0]:.4f}, CE {final[student][1]:.4f})")
    kd, ce = final.get("depth", next(iter(final.values())))
    print(f"kd_val_loss={kd:.4f} ce_val_loss={ce:.4f}")


if __name__ == "__main__":
    main()
