"""The memory plan against measured peaks on CPU, and its per-stage predictions at 8B.

    .venv/bin/python bench/memory_plan.py            # three model sizes, distill and logits
    .venv/bin/python bench/memory_plan.py --quick    # the smallest size only (CI)

For each model size (random Llamas in a fresh temporary folder, the demo's Austen tokens), two
fresh processes measure:

- ``distill``: the trainer built from the checkpoint (weights, DDP buffers, optimizer) and two
  optimizer steps of CE training (two micro-batches each);
- ``logits``: the whole teacher-logits stage (top-64, a few shards).

Measured is the peak resident set (``VmHWM``, reset through ``/proc/self/clear_refs`` after the
runtime started) minus the resident set at that moment, with glibc returning freed memory at
once (``PIPELINES_KEEP_FREED_MEMORY=0``, and a fixed 64 KiB mmap threshold so that glibc's
dynamic threshold does not keep freed blocks below 32 MiB in the heap), so the resident set
follows live tensors as a GPU's ``max_memory_allocated`` would. Predicted is
:mod:`pipelines.launch.memory_plan` for the same shapes on CPU: float32, the local spec (torch's fused
attention kernel, :mod:`pipelines.ops.swiglu`), no framework allowance. Then it prints the GPU predictions
for every stage of both shipped 8B experiments. Last line:
``plan_max_rel_error=<x> worst_8b_stage_gb=<y>`` (x over every measured point).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# (name, hidden, layers, ffn, heads, groups, vocab, sequence, micro batch)
SIZES = [("S", 256, 4, 768, 4, 2, 8192, 256, 4),
         ("M", 512, 6, 1536, 8, 4, 16384, 256, 4),
         ("L", 768, 8, 2048, 12, 4, 32000, 512, 2)]
LOGITS_BATCH, LOGITS_K = 4, 64


def compose(overrides):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import pipelines  # noqa: F401  (resolvers)

    with initialize_config_dir(str(REPO / "configs"), version_base="1.3"):
        return hydra_compose("pipeline", overrides=overrides)


def _rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> int:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    return _rss("VmRSS")


def worker(stage: str, overrides: list[str]) -> dict:
    from pipelines.backend import distributed
    from pipelines.launch.cli import quiet_known_noise

    quiet_known_noise()
    cfg = compose(overrides)
    layout = distributed.initialize(cfg.parallel)
    # code the stage imports lazily is not tensor memory: load it before the baseline
    import megatron.core.dist_checkpointing.strategies.torch  # noqa: F401
    import megatron.core.models.gpt  # noqa: F401
    import megatron.core.optimizer  # noqa: F401
    import torch.distributed.checkpoint  # noqa: F401
    if stage == "distill":
        from pipelines.training.plan import Plan
        from pipelines.training.trainer import Trainer

        plan = Plan(cfg, layout.data_parallel)
        base = _reset_peak()
        trainer = Trainer(plan, layout)
        for _ in range(2):
            trainer.train_step()
    else:
        from pipelines import stages

        base = _reset_peak()
        stages.run("logits", cfg)
    return {"peak_extra_bytes": _rss("VmHWM") - base}


def _arch(hidden, layers, ffn, heads, groups, vocab) -> dict:
    from omegaconf import OmegaConf

    model = OmegaConf.to_container(compose([]).model)
    model.update(num_layers=layers, hidden_size=hidden, ffn_hidden_size=ffn, num_attention_heads=heads,
                 num_query_groups=groups, kv_channels=hidden // heads, vocab_size=vocab,
                 max_position_embeddings=4096)
    return model


def _run_worker(stage: str, overrides: list[str]) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "MASTER_ADDR")}
    env.update(PIPELINES_KEEP_FREED_MEMORY="0", MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0",
               OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "2"))
    output = subprocess.run([sys.executable, __file__, "--worker", stage, "--overrides", json.dumps(overrides)],
                            capture_output=True, text=True, cwd=REPO, env=env)
    line = [x for x in output.stdout.splitlines() if x.startswith("RESULT ")]
    if not line:
        raise SystemExit(f"{stage} worker failed:\n{output.stdout[-2000:]}\n{output.stderr[-4000:]}")
    return json.loads(line[0][len("RESULT "):])


def measure(folder: Path, size, data: str) -> list[tuple[str, float, float]]:
    from omegaconf import OmegaConf

    from pipelines.hf.random_hf import write_random_hf
    from pipelines.launch import memory_plan
    from pipelines.model import build as model_lib
    from pipelines.stages import import_

    name, hidden, layers, ffn, heads, groups, vocab, sequence, micro_batch = size
    model = _arch(hidden, layers, ffn, heads, groups, vocab)
    hf, checkpoint = folder / f"{name}_hf", folder / name
    write_random_hf(OmegaConf.create({"output": str(hf), "seed": 0, "dtype": "float32", "model": model}))
    import_.import_hf(OmegaConf.create({"source": str(hf), "output": str(checkpoint),
                                        "make_vocab_size_divisible_by": 128}))
    arch = model_lib.architecture(model)
    distill = [f"data.output={data}", f"distill.student={checkpoint}", "distill.teacher=none",
               "distill.kd_weight=0", f"distill.output={folder / (name + '_out')}",
               f"distill.sequence_length={sequence}", f"distill.micro_batch_size={micro_batch}",
               f"distill.global_batch_size={2 * micro_batch}", "distill.train_steps=100"]
    logits = [f"data.output={data}", f"logits.teacher={checkpoint}", f"logits.output={folder / (name + '_cache')}",
              f"logits.sequence_length={sequence}", f"distill.sequence_length={sequence}",
              f"logits.batch_size={LOGITS_BATCH}", f"logits.k={LOGITS_K}", f"logits.samples={2 * LOGITS_BATCH}",
              f"logits.samples_per_shard={LOGITS_BATCH}"]
    cfg = compose(distill)
    predicted = {
        "distill": memory_plan.training(
            arch, sequence=sequence, micro_batch=micro_batch, microbatches=2, tensor=1, pipeline=1, data=1,
            element_bytes=4, distributed_optimizer=bool(cfg.distill.distributed_optimizer), fused=False,
            chunk_tokens=int(cfg.distill.chunk_tokens), gpu=False).total,
        "logits": memory_plan.forward(arch, sequence=sequence, batch=LOGITS_BATCH, tensor=1, element_bytes=4,
                                      chunk_tokens=int(cfg.logits.chunk_tokens), gpu=False,
                                      sampled=str(cfg.logits.mode) == "sampled").total}
    rows = []
    for stage, overrides in (("distill", distill), ("logits", logits)):
        measured = _run_worker(stage, overrides)["peak_extra_bytes"]
        rows.append((f"{name} {stage}", predicted[stage], measured))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/austen", help="prepared token data (make prepare)")
    parser.add_argument("--quick", action="store_true", help="the smallest size only")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--overrides", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, json.loads(args.overrides))))
        return
    from pipelines import stages
    from pipelines.core.artifacts import read_manifest
    from pipelines.launch import memory_plan, preflight
    from pipelines.launch import plan as plan_

    if read_manifest(Path(args.data)) is None:  # the demo corpus, tokenized once
        stages.run("prepare", compose(["experiment=demo", f"data.output={args.data}"]))
    rows = []
    with tempfile.TemporaryDirectory(prefix="memory_plan-") as temporary:
        for size in SIZES[:1] if args.quick else SIZES:
            rows += measure(Path(temporary), size, args.data)
    print(f"{'CPU point':<12} {'predicted MiB':>14} {'measured MiB':>13} {'error':>7}")
    errors = []
    for label, predicted, measured in rows:
        error = abs(predicted - measured) / measured
        errors.append(error)
        print(f"{label:<12} {predicted / 2**20:14.1f} {measured / 2**20:13.1f} {error:7.1%}")
    worst = 0.0
    for experiment in ("llama31_8b_width_4b", "llama31_8b_depth_4b"):
        cfg = compose([f"experiment={experiment}"])
        stages = plan_.pipeline_stages(cfg)
        estimates = memory_plan.plan(cfg, stages, preflight.check(cfg, stages))
        print(f"{experiment} (H100 80 GB, bf16, TE spec), predicted peak per GPU:")
        for estimate in estimates:
            print(f"  {estimate.line()}")
            worst = max(worst, estimate.total)
    print(f"plan_max_rel_error={max(errors):.3f} worst_8b_stage_gb={worst / 1e9:.1f}")


if __name__ == "__main__":
    main()
