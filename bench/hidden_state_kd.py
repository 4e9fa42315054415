"""Hidden-state distillation against logits-only KD, on a depth student, at equal tokens and over seeds.

    .venv/bin/python bench/hidden_state_kd.py                  # the SmolLM2-135M run (as make demo-real makes it)
    .venv/bin/python bench/hidden_state_kd.py --steps 20       # shorter
    .venv/bin/python bench/hidden_state_kd.py --quick          # the demo run, 20 steps, 1 seed (CI)

The run's stages up to the teacher cache run first (``scripts/stage.py``: skipped where ``make
demo`` or ``make demo-real`` already ran them). From the run's depth-pruned student, with the
experiment's distill settings and ``--steps`` steps (the same student tokens for all), for each
of ``--seeds`` data orders (``distill.data_seed``), three students are distilled:

- ``logits_only``: KD from the online teacher (``distill.teacher=online``), logits only;
- ``with_hidden``: the same plus a cosine term at every student layer against the teacher layer it
  came from (``distill.intermediate``, ``teacher: null``), ``--weight`` in all, split evenly;
- ``cached``: the default, KD from the run's cache (64 sampled labels per token).

Each student's validation loss is the distill stage's own at its last step. Everything is
written in a fresh temporary folder under the run, removed afterwards. Last line:
``logits_only=<mean> with_hidden=<mean> cached=<mean> sd=<largest sd> seeds=<n>``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from common import mean_sd, read, smollm2_checkpoint, stage


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default=None, help="the run folder (default: runs/smollm2_135m; --quick: runs/demo)")
    parser.add_argument("--steps", type=int, default=None, help="distillation steps (default: the experiment's)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--weight", type=float, default=1.0, help="the hidden-state terms' total weight")
    parser.add_argument("--quick", action="store_true", help="the demo run, 20 steps, 1 seed (CI)")
    parser.add_argument("overrides", nargs="*", help="more Hydra overrides for every stage")
    args = parser.parse_args(argv)
    run = Path(args.run or ("runs/demo" if args.quick else "runs/smollm2_135m"))
    experiment = "demo" if args.quick or run.name == "demo" else run.name
    if args.quick:
        args.steps, args.seeds = args.steps or 20, 1
    if experiment == "smollm2_135m":
        smollm2_checkpoint()
    common = [f"experiment={experiment}", "prune=depth", *args.overrides]
    print(f"[hidden_state_kd] {run}: the stages up to the teacher cache", flush=True)
    stage("stage", ["prepare,import,correct,prune,logits", *common[:1], "run.students=[depth]", *args.overrides])
    student = read(run / "prune_depth")
    layers = int(student["report"]["config_after"]["num_layers"])
    pairs = ",".join(f"{{student:{n},teacher:null,loss:cosine,weight:{args.weight / layers}}}" for n in range(layers))
    variants = {"logits_only": ["distill.teacher=online"],
                "with_hidden": ["distill.teacher=online", f"distill.intermediate=[{pairs}]"],
                "cached": []}
    steps = [f"distill.train_steps={args.steps}"] if args.steps else []
    losses: dict[str, list[float]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory(prefix="bench_hidden_state_kd-", dir=run) as fresh:
        for seed in range(1, args.seeds + 1):
            for name, extra in variants.items():
                output = Path(fresh) / f"{name}_{seed}"
                stage("distill", [*common, *steps, *extra, f"distill.data_seed={seed}", f"distill.output={output}",
                                  "distill.log_interval=1000"])
                losses[name].append(read(output)["final"]["val_loss"])
                print(f"[hidden_state_kd] seed {seed} {name}: validation loss {losses[name][-1]:.4f}", flush=True)
    mean, sd = mean_sd(losses)
    print(f"\ndepth student of {run}, {layers} layers paired with their source layers; validation loss, "
          f"mean ± sd over {args.seeds} seeds:")
    for name in variants:
        print(f"  {name:12s} {mean[name]:.4f} ± {sd[name]:.4f}   ({', '.join(f'{v:.4f}' for v in losses[name])})")
    print(f"logits_only={mean['logits_only']:.4f} with_hidden={mean['with_hidden']:.4f} cached={mean['cached']:.4f} "
          f"sd={max(sd.values()):.4f} seeds={args.seeds}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
