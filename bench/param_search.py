"""prune=search against hand-written shapes at the same parameter budget, on the demo teacher.

    .venv/bin/python bench/param_search.py [--budget 0.7] [--teacher runs/demo/correct]
    .venv/bin/python bench/param_search.py --quick      # fewer calibration and held-out sequences (CI)

At one budget (a fraction of the teacher's parameters; shapes counted as the search counts them) it
prunes the teacher four ways and scores each on the same held-out sequences (validation loss
after pruning, before any distillation):

- ``search``: ``prune=search`` (ModelOpt's Minitron search, width and depth together);
- ``depth``: the most layers within the budget, the block chosen by the loss criterion;
- ``ffn``: the widest MLP within the budget (a multiple of the search's MLP step), the rest kept;
- ``hidden``: the widest hidden size within the budget (a multiple of the head count), the rest kept.

Last line: ``budget=<p> chosen_params=<p> chosen_val_loss=<x> best_manual_val_loss=<y>``.
Goal: chosen_params <= budget and x <= y.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def largest(values, fits):
    """The largest of ``values`` for which ``fits`` holds, or None."""
    return max((v for v in values if fits(v)), default=None)


def main() -> None:
    from pipelines import stages
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=0.7, help="a fraction of the teacher's parameters")
    parser.add_argument("--teacher", type=Path, default=REPO / "runs" / "demo" / "correct")
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument("--eval-samples", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help="16 calibration, 8 held-out sequences (CI)")
    parser.add_argument("--search-args", default="", help="more overrides of the search, e.g. "
                        "'prune.search.max_depth_pruning=0.5'")
    args = parser.parse_args()
    if args.quick:
        args.calib_samples, args.eval_samples = 16, 8
    from pipelines.core.errors import require
    from pipelines.launch.cli import quiet_known_noise
    from pipelines.launch.preflight import compose_pipeline
    from pipelines.model import checkpoint
    from pipelines.model.build import count_parameters
    from pipelines.pruning import search

    quiet_known_noise()
    require((args.teacher / "manifest.json").exists(), f"no finished checkpoint in {args.teacher}; run make demo "
            "first", "--teacher")
    teacher, _ = checkpoint.read_architecture(args.teacher, "--teacher")
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        common = ["experiment=demo", f"prune.source={args.teacher}", f"prune.calib_samples={args.calib_samples}",
                  f"prune.eval_samples={args.eval_samples}"]
        cache = f"prune.scores_cache={work / 'scores'}"   # width and search: one calibration pass
        cfg = compose_pipeline([*common, "prune=search", f"prune.target_params={args.budget}",
                                *args.search_args.split()])
        wanted = search.budget(cfg, teacher)
        steps = search.divisors(teacher, cfg.prune.search)

        def fits(**shape):
            return search.counted({**teacher, **shape}) <= wanted

        manual = {
            "depth": ["prune=depth", f"prune.target_num_layers="
                      f"{largest(range(1, teacher['num_layers']), lambda n: fits(num_layers=n))}"],
            "ffn": ["prune=width", cache, "prune.target.hidden_size=null", "prune.target.num_attention_heads=null",
                    "prune.target.ffn_hidden_size="
                    f"{largest(range(steps['ffn_hidden_size_divisor'], teacher['ffn_hidden_size'] + 1, steps['ffn_hidden_size_divisor']), lambda f: fits(ffn_hidden_size=f))}"],
            "hidden": ["prune=width", cache, "prune.target.ffn_hidden_size=null",
                       "prune.target.num_attention_heads=null", "prune.target.hidden_size="
                       f"{largest(range(teacher['num_attention_heads'], teacher['hidden_size'] + 1, teacher['num_attention_heads']), lambda h: fits(hidden_size=h))}"],
        }
        results = {}
        for name, overrides in {"search": ["prune=search", cache, f"prune.target_params={args.budget}", *args.search_args.split()],
                                    **manual}.items():
            if overrides[-1].endswith("=None"):
                print(f"{name}: no shape of this kind within the budget")
                continue
            report = stages.run("prune", compose_pipeline([*common, *overrides,
                                                           f"prune.output={work / name}"]))["report"]
            results[name] = report
    print(f"\nteacher: {count_parameters(teacher):,} parameters, budget {args.budget} -> "
          f"{wanted:,}; validation loss after pruning, {args.eval_samples} held-out sequences, no distillation")
    print(f"{'student':8} {'layers':>6} {'hidden':>6} {'ffn':>6} {'parameters':>11} {'val loss':>9}")
    for name, report in results.items():
        shape = report["config_after"]
        print(f"{name:8} {shape['num_layers']:6d} {shape['hidden_size']:6d} {shape['ffn_hidden_size']:6d} "
              f"{search.counted(shape):11,d} {report['val_loss_pruned']:9.4f}")
    chosen = results["search"]
    best_manual = min(r["val_loss_pruned"] for n, r in results.items() if n != "search")
    print(f"budget={wanted} chosen_params={search.counted(chosen['config_after'])} "
          f"chosen_val_loss={chosen['val_loss_pruned']:.4f} best_manual_val_loss={best_manual:.4f}")


if __name__ == "__main__":
    main()
