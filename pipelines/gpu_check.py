"""``make gpu-check``: what to run first on a GPU node, before a long job (``scripts/gpu_check.py``).

1. The environment: GPU, CUDA, transformer-engine, and the tested megatron-core / ModelOpt.
2. The tiny pipeline end to end on one GPU in bf16 (the demo, shortened, in its own run folder):
   import, teacher pre-training, depth and width pruning, logits, distillation, eval, export,
   through the same stage runner as ``make pipeline``, with the TE spec when TE is installed.
3. A real-shaped slice: 2 layers at Llama-3.1-8B's width (hidden 4096, MLP 14336, 32 heads, 8
   KV groups, vocabulary 128,256) at sequence 8192, imported from a random Hugging Face folder and
   trained a few steps by the distill trainer; it reports tokens/s and the peak memory allocated
   against :mod:`pipelines.memory_plan`'s prediction for the same shapes.

On a machine without a GPU it says so and exits with status 2: it never passes silently. The
figures go to ``<paths.runs>/gpu_check/result.json``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from pipelines.errors import UserError

SLICE = {"num_layers": 2, "hidden_size": 4096, "ffn_hidden_size": 14336, "num_attention_heads": 32,
         "num_query_groups": 8, "kv_channels": 128, "vocab_size": 128256, "max_position_embeddings": 8192}
SLICE_SEQUENCE, SLICE_STEPS, SLICE_GLOBAL_BATCH = 8192, 6, 4
# the demo, shortened: every stage runs, in minutes
TINY_ARGS = ["correct.train_steps=60", "correct.eval_interval=30", "correct.save_interval=30",
             "distill.train_steps=30", "distill.eval_interval=15", "distill.save_interval=15",
             "prune.calib_samples=16", "eval.limit=1"]


def environment() -> dict:
    import torch

    from pipelines import runtime

    if not torch.cuda.is_available():
        raise UserError("no GPU on this machine (torch.cuda.is_available() is False): gpu-check needs one; "
                        "run it on a GPU node, e.g. make gpu-check PYTHON=python inside the container",
                        "the machine")
    runtime.check_versions()
    properties = torch.cuda.get_device_properties(0)
    from importlib.metadata import version

    return {"gpu": properties.name, "gpu_memory_gb": properties.total_memory / 1e9,
            "gpus": torch.cuda.device_count(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "transformer_engine": runtime.transformer_engine_available(),
            "megatron_core": version("megatron-core"), "modelopt": version("nvidia-modelopt")}


def tiny_pipeline(runs: Path) -> dict:
    """The shortened demo on one GPU, as a user runs it (a fresh run folder each time)."""
    started = time.perf_counter()
    command = [sys.executable, "scripts/stage.py", "pipeline", "experiment=demo", "run.name=gpu_check_tiny",
               f"paths.runs={runs}", "force=true", *TINY_ARGS]
    print(f"[gpu-check] tiny pipeline: {' '.join(command)}", flush=True)
    result = subprocess.run(command, cwd=Path(__file__).resolve().parents[1])
    if result.returncode != 0:
        raise SystemExit(f"[gpu-check] the tiny pipeline failed (status {result.returncode}); see above")
    report = json.loads((runs / "gpu_check_tiny" / "report.json").read_text())
    return {"seconds": time.perf_counter() - started, "report": report}


def real_slice(folder: Path, data: Path) -> dict:
    """A few distill steps of a 2-layer slice at Llama-3.1-8B's width, sequence 8192."""
    import torch
    from omegaconf import OmegaConf

    from pipelines import convert, memory_plan, runtime
    from pipelines import model as model_lib
    from pipelines.distill import Plan, Trainer
    from pipelines.random_hf import write_random_hf

    from hydra import compose, initialize_config_dir

    repo = Path(__file__).resolve().parents[1]
    with initialize_config_dir(str(repo / "configs"), version_base="1.3"):
        base = compose("pipeline")
    model = {**OmegaConf.to_container(base.model), **SLICE}
    hf, checkpoint = folder / "slice_hf", folder / "slice"
    if not (checkpoint / "manifest.json").exists():
        if not (hf / "config.json").exists():
            write_random_hf(OmegaConf.create({"output": str(hf), "seed": 0, "dtype": "bfloat16", "model": model}))
        convert.import_hf(OmegaConf.create({"source": str(hf), "output": str(checkpoint),
                                            "make_vocab_size_divisible_by": 128}))
    overrides = [f"data.output={data}", f"distill.student={checkpoint}", "distill.teacher=none",
                 "distill.kd_weight=0", f"distill.output={folder / 'slice_out'}",
                 f"distill.sequence_length={SLICE_SEQUENCE}", "distill.micro_batch_size=1",
                 f"distill.global_batch_size={SLICE_GLOBAL_BATCH}", "distill.train_steps=100"]
    with initialize_config_dir(str(repo / "configs"), version_base="1.3"):
        cfg = compose("pipeline", overrides=overrides)
    layout = runtime.initialize(cfg.parallel)
    plan = Plan(cfg, layout.data_parallel)
    torch.cuda.reset_peak_memory_stats()
    trainer = Trainer(plan, layout)
    trainer.train_step()  # warm-up
    torch.cuda.synchronize()
    times = []
    for _ in range(SLICE_STEPS):
        started = time.perf_counter()
        trainer.train_step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    times.sort()
    step = times[len(times) // 2]
    peak = torch.cuda.max_memory_allocated()
    arch = model_lib.architecture(model)
    estimate = memory_plan.training(
        arch, sequence=SLICE_SEQUENCE, micro_batch=1, microbatches=SLICE_GLOBAL_BATCH, tensor=1, pipeline=1,
        data=1, element_bytes=2, distributed_optimizer=bool(cfg.distill.distributed_optimizer),
        fused=runtime.transformer_engine_available(), chunk_tokens=int(cfg.distill.chunk_tokens), gpu=False)
    return {"step_seconds_median": step, "tokens_per_s": SLICE_GLOBAL_BATCH * SLICE_SEQUENCE / step,
            "peak_allocated_gb": peak / 1e9, "predicted_gb": estimate.total / 1e9,
            "predicted_parts_gb": {k: v / 1e9 for k, v in estimate.parts.items()},
            "prediction_error": abs(estimate.total - peak) / peak, "dtype": str(trainer.dtype)}


def main(argv: list[str]) -> None:
    """``gpu_check.py [key=value ...]``: the pipeline overrides (e.g. ``paths.runs=/scratch/runs``)."""
    from hydra import compose, initialize_config_dir

    import pipelines  # noqa: F401  (resolvers)

    repo = Path(__file__).resolve().parents[1]
    facts = environment()
    print("[gpu-check] " + ", ".join(f"{k} {v}" for k, v in facts.items()), flush=True)
    with initialize_config_dir(str(repo / "configs"), version_base="1.3"):
        cfg = compose("pipeline", overrides=["experiment=demo", *argv])
    runs = Path(str(cfg.paths.runs)).resolve()
    result = {"environment": facts, "tiny": tiny_pipeline(runs)}
    print(f"[gpu-check] tiny pipeline passed in {result['tiny']['seconds']:.0f} s", flush=True)
    slice_result = real_slice(runs / "gpu_check", Path(str(cfg.data.output)).resolve())
    result["slice"] = slice_result
    print(f"[gpu-check] 8B-width slice (2 layers, sequence {SLICE_SEQUENCE}, {slice_result['dtype']}): "
          f"{slice_result['tokens_per_s']:,.0f} tokens/s, peak allocated {slice_result['peak_allocated_gb']:.1f} GB, "
          f"memory plan {slice_result['predicted_gb']:.1f} GB ({slice_result['prediction_error']:.0%} off)", flush=True)
    output = runs / "gpu_check" / "result.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2, default=str))
    print(f"[gpu-check] passed; figures in {output}", flush=True)
