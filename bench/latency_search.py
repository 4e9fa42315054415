"""A student by latency: the search under the depth student's decode latency, ranked by a short distillation.

    .venv/bin/python bench/latency_search.py            # the SmolLM2-135M run (as make demo-real makes it)
    .venv/bin/python bench/latency_search.py --quick    # the demo run, a few steps (CI)

The run's stages up to the teacher cache and the hand-written students run first
(``scripts/stage.py``: skipped where ``make demo-real`` already ran them). Then:

1. **the target**: the decode latency of the experiment's depth student (30 -> 20 layers),
   ``prune.latency.reference``: timed by the prune stage as it times the candidates
   (:mod:`pipelines.pruning.targets`: random weights, transformers);
2. **the search**: ``prune=search`` under that target (no parameter budget), the ``--top-k`` largest shapes that meet it each distilled ``--rank-steps`` steps from
   the run's cache, the lowest held-out loss chosen. The same report names the candidate the loss
   right after pruning would have chosen;
3. **the comparison**: four students distilled with the experiment's settings for ``--steps``
   steps each, from their pruned checkpoints: the searched one, the one ranked by the loss after
   pruning, the depth and the width student. Each one's loss is the distill stage's own at its
   last step (held-out). The ranking's own tokens (top_k x rank_steps) are extra, and printed;
4. **the check of the latency**: the target shape, the chosen shape and the width student's timed
   whole again, alternating, ``--repeats`` times each; medians.

Everything is written in a fresh temporary folder under the run, removed afterwards. Last line:
``target_ms=<t> chosen_ms=<c> chosen_val_loss=<x> after_prune_rank_val_loss=<r> depth_val_loss=<d>
width_val_loss=<w> width_ms=<m>``. The goal: c <= 1.05 t and x <= min(r, d, w).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from omegaconf import OmegaConf

from common import REPO, read, smollm2_checkpoint, stage
sys.path.insert(0, str(REPO))

from pipelines.backend import distributed  # noqa: E402
from pipelines.pruning import targets  # noqa: E402


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default=None, help="the run folder (default: runs/smollm2_135m; --quick: runs/demo)")
    parser.add_argument("--steps", type=int, default=None, help="final distillation steps (default: the experiment's)")
    parser.add_argument("--rank-steps", type=int, default=15, help="each candidate's short distillation")
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=7, help="alternating whole timings of target and chosen")
    parser.add_argument("--quick", action="store_true", help="the demo run, 4 ranking and 20 final steps (CI)")
    parser.add_argument("overrides", nargs="*", help="more Hydra overrides for every stage")
    args = parser.parse_args(argv)
    run = Path(args.run or ("runs/demo" if args.quick else "runs/smollm2_135m"))
    experiment = "demo" if args.quick or run.name == "demo" else run.name
    if args.quick:
        args.steps, args.rank_steps, args.top_k, args.repeats = args.steps or 20, 4, 2, 3
    if experiment == "smollm2_135m":
        smollm2_checkpoint()
    common = [f"experiment={experiment}", *args.overrides]
    print(f"[latency_search] {run}: the stages up to the teacher cache and the hand-written students", flush=True)
    stage("stage", ["prepare,import,correct,logits,prune", *common, "run.students=[depth,width]"])
    depth = read(run / "prune_depth")["report"]["config_after"]
    teacher_layers = read(run / "prune_depth")["report"]["config_before"]["num_layers"]
    # the search's grid, coarse enough to time on a CPU in minutes; depth down to the depth student's
    depth_share = 1 - depth["num_layers"] / teacher_layers + 0.01
    latency = {"batch": 1, "context": 256 if not args.quick else 64, "decode_tokens": 16, "repeats": 5,
               "whole_limit": 1000, "check_shapes": 4, "max_error": 0.1}
    # every shape timed whole: on this shared 2-core CPU the per-layer model missed whole timings by 10-15% in
    # three runs (a 24-layer shape's own whole timing moved from 42 to 48 ms between runs), hence the coarse grid
    # (the demo's shapes take about 2 ms a step, mostly Python: too noisy for the part model; timed whole)
    host = distributed.Layout(0, 1, 0, 1, 1, 1, 1, torch.device("cpu"))
    settings = OmegaConf.create(latency)
    steps = [f"distill.train_steps={args.steps}"] if args.steps else []
    with tempfile.TemporaryDirectory(prefix="bench_latency_search-", dir=run) as fresh:
        fresh = Path(fresh)
        search = [*common, "prune=search", "run.student=latency", "prune.target_params=null",
                  f"prune.latency.reference={{num_layers:{depth['num_layers']}}}", f"prune.search.max_depth_pruning={depth_share:.3f}",
                  f"prune.search.top_k={args.top_k}", f"prune.search.distill_steps={args.rank_steps}",
                  f"prune.output={fresh / 'searched'}", f"prune.candidates={fresh / 'candidates'}",
                  *[f"prune.latency.{k}={v}" for k, v in latency.items()]]
        if not args.quick:   # SmolLM2: hidden in steps of 144 (16 x its 9 heads), MLP of 256, layers of 2: 71 shapes
            search += ["prune.search.hidden_size_divisor=144", "prune.search.ffn_hidden_size_divisor=256",
                       "prune.search.num_layers_divisor=2"]
        print(stage("prune", search).split("[prune] search:", 1)[-1][-4000:], flush=True)
        report = read(fresh / "searched")["report"]
        print(f"[latency_search] target: the depth student ({depth['num_layers']} layers), timed by the stage: "
              f"{report['targets']['latency_ms']:.3f} ms per step at batch 1 after {latency['context']} tokens",
              flush=True)
        rows = report["candidates"]
        chosen = next(r for r in rows if r["chosen"])
        after_prune = next(r for r in rows if r["chosen_after_pruning"])
        students = {"chosen": Path(chosen["pruned"]), "after_prune_rank": Path(after_prune["pruned"]),
                    "depth": run / "prune_depth", "width": run / "prune_width"}
        losses = {}
        for name, student in students.items():
            if name == "after_prune_rank" and after_prune is chosen:
                losses[name] = losses["chosen"]
                continue
            output = fresh / f"distill_{name}"
            stage("distill", [*common, *steps, f"distill.student={student}", f"distill.output={output}",
                              "distill.log_interval=1000"])
            losses[name] = read(output)["final"]["val_loss"]
            print(f"[latency_search] {name}: validation loss {losses[name]:.4f}", flush=True)
        tokens = read(fresh / "distill_chosen")["tokens"]
        ranking_tokens = sum(r.get("distill_tokens", 0) for r in rows)
    # the latency claim, checked: the two shapes timed whole again, alternating
    shapes = {"target": depth, "chosen": {**depth, **chosen["architecture"]},
              "width": read(run / "prune_width")["report"]["config_after"]}
    times: dict[str, list[float]] = {name: [] for name in shapes}
    for repeat in range(args.repeats):
        for name in (list(shapes) if repeat % 2 == 0 else list(shapes)[::-1]):
            times[name].append(targets.time_shape(shapes[name], settings, host))
    median = {name: statistics.median(values) for name, values in times.items()}
    target_ms, chosen_ms = median["target"], median["chosen"]
    print(f"\n{run}: {args.repeats} alternating whole timings each (median, min-max): " + ", ".join(
        f"{name} {median[name]:.3f} ms ({min(times[name]):.3f}-{max(times[name]):.3f})" for name in shapes))
    print(f"candidates ({report['latency']['method']} latency; after {args.rank_steps} steps each, "
          f"{ranking_tokens:,} ranking tokens in all):")
    for row in rows:
        print(f"  {row['name']:20s} {row['params'] / 1e6:6.1f} M  {row['latency_ms']:8.3f} ms  after pruning "
              f"{row['val_loss_pruned']:.4f}  after {args.rank_steps} steps {row['val_loss_distilled']:.4f}"
              f"{'  <- chosen' if row['chosen'] else ''}{'  <- after-prune rank' if row['chosen_after_pruning'] else ''}")
    print(f"final distillation, {tokens:,} tokens each:")
    for name, value in losses.items():
        print(f"  {name:18s} {value:.4f}")
    print(f"target_ms={target_ms:.3f} chosen_ms={chosen_ms:.3f} chosen_val_loss={losses['chosen']:.4f} "
          f"after_prune_rank_val_loss={losses['after_prune_rank']:.4f} depth_val_loss={losses['depth']:.4f} "
          f"width_val_loss={losses['width']:.4f} width_ms={median['width']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
