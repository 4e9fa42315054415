"""What FP8 and INT4-AWQ cost a distilled student in held-out loss, after PTQ and after QAD, at equal tokens.

    .venv/bin/python bench/quantize_cost.py                       # the SmolLM2-135M run (as make demo-real makes it)
    .venv/bin/python bench/quantize_cost.py --quick               # the demo run, 20 steps (CI)
    .venv/bin/python bench/quantize_cost.py --run runs/demo --student width  distill.train_steps=40

The run's stages up to the teacher cache run first (``scripts/stage.py``: skipped where ``make
demo`` or ``make demo-real`` already ran them; SmolLM2 is converted from its PyPI package once).
From the run's pruned ``--student`` and its teacher cache, with the experiment's distill settings
(steps, batch, learning rate), three students are distilled from the same start for the same
number of steps, so the same student tokens:

- ``plain``: the ordinary distillation, then post-training quantization (the quantize stage) to
  FP8 and to INT4-AWQ: PTQ;
- ``qad_fp8`` and ``qad_int4``: distilled fake-quantized (``distill.quantize=fp8`` /
  ``int4_awq``) from the same cache, then quantized by the same stage to their format: QAD.

Every model is scored by the eval stage from its files (the quantized exports fake-quantized, as
``make eval`` scores them) on the run's validation split. Each delta is a quantized model's
validation loss minus the unquantized plain student's, in nats. Everything is written in a fresh
temporary folder under the run, removed afterwards. Last line:
``fp8_ptq_delta=<nats> fp8_qad_delta=<nats> int4_ptq_delta=<nats> int4_qad_delta=<nats>``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from common import smollm2_checkpoint, stage
FORMATS = {"fp8": "fp8", "int4": "int4_awq"}


def val_loss(common: list[str], checkpoint: Path, output: Path) -> float:
    stage("eval", [*common, f"eval.model={checkpoint}", f"eval.output={output}", "eval.mmlu.enabled=false",
                   "eval.corpus.enabled=false", f"eval.name={output.name}"])
    return json.loads((output / "results.json").read_text())["val_loss"]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default=None, help="the run folder (default: runs/smollm2_135m; --quick: runs/demo)")
    parser.add_argument("--student", default="depth")
    parser.add_argument("--quick", action="store_true", help="the demo run, 20 distillation steps (CI)")
    parser.add_argument("overrides", nargs="*", help="more Hydra overrides for every stage")
    args = parser.parse_args(argv)
    run = Path(args.run or ("runs/demo" if args.quick else "runs/smollm2_135m"))
    experiment = "demo" if args.quick or run.name == "demo" else run.name
    if experiment == "smollm2_135m":
        smollm2_checkpoint()
    common = [f"experiment={experiment}", f"prune={args.student}", *args.overrides]
    print(f"[quantize_cost] {run}: the stages up to the teacher cache", flush=True)
    stage("stage", ["prepare,import,correct,prune,logits", *common[:1], f"run.students=[{args.student}]",
                    *args.overrides])
    if args.quick:
        common += ["distill.train_steps=20", "quantize.calib_samples=8", "eval.val_samples=16"]
    losses = {}
    with tempfile.TemporaryDirectory(prefix="bench_quantize_cost-", dir=run) as fresh:
        work = Path(fresh)
        students = {"plain": None, "qad_fp8": "fp8", "qad_int4": "int4_awq"}
        for name, fmt in students.items():
            print(f"[quantize_cost] distilling {name} ({'QAD ' + fmt if fmt else 'plain'})", flush=True)
            stage("distill", [*common, f"distill.output={work / name}", "distill.log_interval=1000",
                              *([f"distill.quantize={fmt}"] if fmt else [])])
        losses["plain"] = val_loss(common, work / "plain", work / "eval_plain")
        for short, fmt in FORMATS.items():
            for kind, source in (("ptq", "plain"), ("qad", f"qad_{short}")):
                quantized = work / f"quantized_{kind}_{short}"
                stage("quantize", [*common, f"quantize.source={work / source}", f"quantize.output={quantized}",
                                   f"quantize.formats=[{fmt}]"])
                losses[f"{short}_{kind}"] = val_loss(common, quantized / fmt, work / f"eval_{short}_{kind}")
            if not args.quick:   # the QAD student before its quantization, for the table
                losses[f"qad_{short}_unquantized"] = val_loss(common, work / f"qad_{short}", work / f"eval_qad_{short}")
    print(f"\n{args.student} student of {run}, validation loss (nats), equal student tokens:")
    print(f"  unquantized, plain distillation           {losses['plain']:.4f}")
    for short, fmt in FORMATS.items():
        print(f"  {fmt:8s} PTQ of the plain student          {losses[f'{short}_ptq']:.4f} "
              f"({losses[f'{short}_ptq'] - losses['plain']:+.4f})")
        print(f"  {fmt:8s} QAD student, quantized            {losses[f'{short}_qad']:.4f} "
              f"({losses[f'{short}_qad'] - losses['plain']:+.4f})"
              + (f"; unquantized {losses[f'qad_{short}_unquantized']:.4f}" if not args.quick else ""))
    print(" ".join(f"{short}_{kind}_delta={losses[f'{short}_{kind}'] - losses['plain']:.4f}"
                   for short in FORMATS for kind in ("ptq", "qad")))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
