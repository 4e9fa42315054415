"""The time plan of the shipped 8B experiments: each stage's layout, predicted MFU and wall time.

    .venv/bin/python bench/time_plan.py                 # on H100s (cluster.gpu=h100)
    .venv/bin/python bench/time_plan.py --gpu h200

No compute: :mod:`pipelines.launch.time_plan` and :mod:`pipelines.launch.memory_plan` on the
experiments' configs. It prints

1. the calibration: the model's step time for the one GPU step the project measured (the
   8B-width slice on one H200) and the efficiency that fit gives;
2. the check: the model's MFU for Megatron-LM's Llama-3-8B on 8×H100 (TP=1, global batch 128,
   sequence 8192), in Megatron's count (attention over the whole square), against its published
   figure;
3. for each shipped 8B experiment, every layout each training and forward stage could run with on
   one node (TP 1, 2, 4, 8 and data parallel over the rest), with its predicted peak memory, memory
   margin, step time and MFU, the shipped one marked, and the fastest one with a margin of at least
   10% starred;
4. the shipped experiments' plans, stage by stage, and the job's GPU-hours.

Last line: ``distill_mfu=<x> distill_hours=<h> job_gpu_hours=<g>`` for llama31_8b_width_4b, the
shipped layouts. Goal: distill MFU ≥ 0.50 on H100 with a memory margin ≥ 10%.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

EXPERIMENTS = ("llama31_8b_width_4b", "llama31_8b_depth_4b", "llama31_8b_search_4b")
STAGES = ("correct", "distill", "logits", "eval")
MARGIN = 0.10


def planned(overrides: list[str]):
    """``(cfg, stages, memory estimates, time estimates)`` of an experiment with ``overrides``."""
    from pipelines.core.errors import UserError
    from pipelines.launch import memory_plan, preflight, time_plan
    from pipelines.launch.plan import pipeline_stages

    cfg = preflight.compose_pipeline(overrides)
    stages = [s for s in pipeline_stages(cfg) if s not in ("quantize", "speed")]
    try:
        checked = preflight.check(cfg, stages)
    except UserError as error:
        return cfg, stages, None, str(error)
    return cfg, stages, memory_plan.plan(cfg, stages, checked), time_plan.plan(cfg, stages, checked)


def layouts(experiment: str, gpu: str, stage: str) -> list[tuple]:
    """``(tensor, memory GB, margin, StepTime | error)`` for each TP of ``stage`` on one node."""
    rows = []
    for tensor in (1, 2, 4, 8):
        extra = [f"++run.stage_parallel.{stage}.tensor={tensor}", f"++run.stage_parallel.{stage}.pipeline=1"]
        cfg, _, memory, timed = planned([f"experiment={experiment}", f"cluster.gpu={gpu}", *extra])
        if memory is None:
            rows.append((tensor, None, None, timed.split(" (")[0]))
            continue
        estimate = next(e for e in memory if e.stage == stage)
        step = next(t for t in timed if t.stage == stage)
        limit = float(cfg.cluster.gpu_memory_gb) * 1e9
        rows.append((tensor, estimate.total / 1e9, 1 - estimate.total / limit, step))
    return rows


_SHIPPED: dict = {}


def shipped_tensor(experiment: str, stage: str) -> int:
    if (experiment, stage) not in _SHIPPED:
        from pipelines.launch import preflight
        from pipelines.stages.rules import stage_parallel

        cfg = preflight.compose_pipeline([f"experiment={experiment}"])
        _SHIPPED[experiment, stage] = int(stage_parallel(cfg, stage)["tensor"])
    return _SHIPPED[experiment, stage]


def distill_arch(experiment: str) -> dict:
    from pipelines.launch import preflight

    cfg = preflight.compose_pipeline([f"experiment={experiment}"])
    return preflight.check(cfg, ["distill"])["student"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", default="h100")
    parser.add_argument("--quick", action="store_true", help="the same (no compute either way)")
    args = parser.parse_args()
    from pipelines.launch import time_plan as tp

    c = tp.CALIBRATION
    calib = tp.training_step(c["arch"], tp.GPUS[c["gpu"]], sequence=c["sequence"], micro_batch=c["micro_batch"],
                             microbatches=c["microbatches"], spec=c["spec"])
    print(f"calibration: 8B-width slice on one H200 (local spec): predicted {calib.seconds:.3f} s/step, "
          f"measured {c['seconds']:.3f} s (GEMM_EFFICIENCY={tp.GEMM_EFFICIENCY})")
    p = tp.PUBLISHED
    check = tp.training_step(p["arch"], tp.GPUS[p["gpu"]], sequence=p["sequence"], micro_batch=1,
                             microbatches=p["global_batch"] // p["gpus"], data=p["gpus"])
    megatron_count = check.mfu * (tp.model_flops_per_token(p["arch"], p["sequence"], causal=False)
                                  / tp.model_flops_per_token(p["arch"], p["sequence"]))
    print(f"check: Megatron-LM Llama-3-8B, 8xH100, TP=1, GBS 128, seq 8192: predicted MFU {megatron_count:.3f} "
          f"in Megatron's count ({check.mfu:.3f} causal), published {p['mfu']:.3f} "
          f"(model {megatron_count / p['mfu'] - 1:+.1%})")
    print()
    for experiment in EXPERIMENTS:
        print(f"{experiment}: layouts on one node of {args.gpu.upper()} (memory limit cluster.gpu_memory_gb)")
        print(f"  {'stage':<8} {'tp':>3} {'dp':>3} {'GB/GPU':>7} {'margin':>7} {'s/step':>8} {'MFU':>6} {'wall h':>7}")
        for stage in STAGES:
            rows = layouts(experiment, args.gpu, stage)
            fits = [r for r in rows if r[1] is not None and r[2] >= MARGIN]
            best = min(fits, key=lambda r: r[3].wall_hours)[0] if fits else None
            for tensor, gb, margin, step in rows:
                mark = ("*" if tensor == best else " ") + ("<- shipped" if tensor == shipped_tensor(experiment, stage)
                                                           else "")
                if gb is None:
                    print(f"  {stage:<8} {tensor:>3}   -  refused: {step}")
                    continue
                print(f"  {stage:<8} {tensor:>3} {step.layout['data']:>3} {gb:7.1f} {margin:7.0%} "
                      f"{step.seconds:8.3f} {step.mfu:6.1%} {step.wall_hours:7.2f} {mark}")
        print()
    summary = None
    for experiment in EXPERIMENTS:
        _, _, memory, timed = planned([f"experiment={experiment}", f"cluster.gpu={args.gpu}"])
        print(f"{experiment}, shipped layouts:")
        for line in tp.job_lines(timed):
            print(f"  {line}")
        if experiment == EXPERIMENTS[0]:
            distill = next(t for t in timed if t.stage == "distill")
            summary = (distill.mfu, distill.wall_hours, sum(t.gpu_hours for t in timed))
            megatron = distill.mfu * (tp.model_flops_per_token(distill_arch(experiment), 8192, causal=False)
                                      / tp.model_flops_per_token(distill_arch(experiment), 8192))
    print(f"{EXPERIMENTS[0]} distill MFU in Megatron-LM's count (attention over the whole square): {megatron:.3f}")
    print(f"distill_mfu={summary[0]:.3f} distill_hours={summary[1]:.2f} job_gpu_hours={summary[2]:.1f}")


if __name__ == "__main__":
    main()
