"""One round of pruning against two, at an equal number of distillation tokens, on the demo teacher.

    .venv/bin/python bench/prune_rounds.py [--target 0.3] [--first 0.6] [--steps 200]
    .venv/bin/python bench/prune_rounds.py --quick      # 20 distillation steps, two variants (CI)

Every variant searches a student by parameter budget (``prune=search``) from the demo's teacher
(``runs/demo/correct``: run ``make demo`` first) and distills it from the teacher's cached logits,
through the launcher, as ``make pipeline`` with ``run.rounds`` would:

- ``one``: one round straight to ``--target`` of the teacher's parameters, ``--steps`` steps;
- ``two``: two rounds, ``--first`` then ``--target``, ``--steps / 2`` steps each, the second
  round on the samples after the first's;
- ``three_default`` (not in --quick): three rounds (``--first``, halfway, ``--target``) at
  ModelOpt's default search limits (40% width, 20% depth per round), at which neither one round
  nor two (60% -> 30% on the demo) can reach the target: the experiment check refuses them.

``one`` and ``two`` share the search limits (``--width``, ``--depth``). Each variant is a run under
``--out`` (skipped when up to date). Printed: the validation-loss curve of each against the
distillation samples seen, the shapes, and the final validation loss (distill's, on the same
held-out sequences); the curves go to ``<out>/curves.png``.

Last line: ``budget=<p> one_round_params=<p> one_round_val_loss=<x> two_rounds_params=<p>
two_rounds_val_loss=<y>``. The issue asks which wins; there is no goal.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def curve(folder: Path, first_sample: int, batch: int) -> list[tuple[int, float]]:
    """``(samples seen, validation loss)`` of a distill run's evaluations."""
    rows = [json.loads(line) for line in (folder / "train" / "metrics.jsonl").read_text().splitlines() if line]
    return [(first_sample + r["step"] * batch, r["val_loss"]) for r in rows if r["kind"] == "eval"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=float, default=0.3, help="the final budget: a fraction of the teacher")
    parser.add_argument("--first", type=float, default=0.6, help="the two-round variant's first budget")
    parser.add_argument("--steps", type=int, default=200, help="distillation steps in all (split over the rounds)")
    parser.add_argument("--width", type=float, default=0.75, help="prune.search.max_width_pruning of one and two")
    parser.add_argument("--depth", type=float, default=0.5, help="prune.search.max_depth_pruning of one and two")
    parser.add_argument("--teacher", type=Path, default=REPO / "runs" / "demo" / "correct")
    parser.add_argument("--out", type=Path, default=None, help="runs folder (default runs/bench_prune_rounds[_quick])")
    parser.add_argument("--quick", action="store_true", help="20 steps, 16 calibration and 8 held-out sequences (CI)")
    args = parser.parse_args()
    if args.quick:
        args.steps = 20
    out = (args.out or REPO / "runs" / ("bench_prune_rounds" + ("_quick" if args.quick else ""))).resolve()
    teacher = args.teacher.resolve()
    if not (teacher / "manifest.json").exists():
        sys.exit(f"error: no finished checkpoint in {teacher}; run make demo first (fix: --teacher)")
    half = args.steps // 2
    common = ["experiment=demo", "prune=search", "run.students=[search]", "distill.eval_interval=10",
              f"logits.reuse_from={REPO / 'runs'}"]
    if args.quick:
        common += ["prune.calib_samples=16", "prune.eval_samples=8", "distill.eval_samples=16", "distill.warmup_steps=2",
                   "distill.eval_interval=5"]
    limits = [f"prune.search.max_width_pruning={args.width}", f"prune.search.max_depth_pruning={args.depth}"]
    variants = {
        "one": (limits, [{"prune": {"target_params": args.target}, "distill": {"train_steps": args.steps}}]),
        "two": (limits, [{"prune": {"target_params": args.first}, "distill": {"train_steps": half}},
                         {"prune": {"target_params": args.target}, "distill": {"train_steps": args.steps - half}}]),
    }
    if not args.quick:
        third = args.steps - 2 * (args.steps // 3)
        variants["three_default"] = ([], [{"prune": {"target_params": budget}, "distill": {"train_steps": steps}}
                                          for budget, steps in ((args.first, args.steps // 3),
                                                                (round((args.first + args.target) / 2, 4), args.steps // 3),
                                                                (args.target, third))])
    results = {}
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "PIPELINES_RUNS")}
    for name, (extra, rounds) in variants.items():
        run = out / name
        run.mkdir(parents=True, exist_ok=True)
        if not (run / "import").exists():
            (run / "import").symlink_to(teacher)       # the run's teacher: the demo's
        text = json.dumps(rounds).replace('"', "").replace(" ", "")
        stages = ",".join(["prune@1", "logits", "distill@1"] + [f"{s}@{k}" for k in range(2, len(rounds) + 1)
                                                                 for s in ("prune", "distill")])
        command = [sys.executable, "scripts/stage.py", stages, *common, *extra, f"run.name={name}",
                   f"run.rounds={text}"]
        print(f"[{name}] {' '.join(command[1:])}", flush=True)
        done = subprocess.run(command, cwd=REPO, env={**env, "PIPELINES_RUNS": str(out)}, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"[{name}] failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        first, points, shapes = 0, [], []
        for number in range(1, len(rounds) + 1):
            folder = run / f"distill_search_r{number}"
            manifest = json.loads((folder / "manifest.json").read_text())
            batch = manifest["inputs"]["settings"]["global_batch_size"]
            points += curve(folder, first, batch)
            first += manifest["steps"] * batch
            config = json.loads((run / f"prune_search_r{number}" / "manifest.json").read_text())["config"]
            params = manifest["parameters"]
            shapes.append(f"{config['num_layers']}L/{config['hidden_size']}/{config['ffn_hidden_size']} "
                          f"({params:,})")
        final = json.loads((run / f"distill_search_r{len(rounds)}" / "manifest.json").read_text())
        results[name] = {"curve": points, "shapes": shapes, "params": final["parameters"],
                         "val_loss": final["final"]["val_loss"]}
    from pipelines.model import build as model_lib
    from pipelines.model.checkpoint import read_architecture
    from pipelines.pruning import search

    arch, _ = read_architecture(teacher)
    budget = int(args.target * model_lib.count_parameters(arch))
    print(f"\nteacher {model_lib.count_parameters(arch):,} parameters (as ModelOpt counts: {search.counted(arch):,}); "
          f"target {args.target:g} = {budget:,}; {args.steps} distillation steps in all\n")
    print("| variant | rounds (layers/hidden/MLP, parameters) | final val loss |\n|---|---|---:|")
    for name, found in results.items():
        print(f"| {name} | {' -> '.join(found['shapes'])} | {found['val_loss']:.4f} |")
    print("\nvalidation loss against distillation samples seen (each round starts with its pruned student):")
    for name, found in results.items():
        print(f"  {name}: " + "  ".join(f"{samples}:{loss:.3f}" for samples, loss in found["curve"]))
    plot(results, out / "curves.png")
    one, two = results["one"], results["two"]
    print(f"budget={budget} one_round_params={one['params']} one_round_val_loss={one['val_loss']:.4f} "
          f"two_rounds_params={two['params']} two_rounds_val_loss={two['val_loss']:.4f}")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for name, found in results.items():
        samples, losses = zip(*found["curve"])
        axis.plot(samples, losses, marker=".", label=f"{name} ({found['params']:,})")
    axis.set_xlabel("distillation samples seen")
    axis.set_ylabel("validation loss")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    print(f"curves: {path}")


if __name__ == "__main__":
    main()
