"""``make gpu-check``: what to run first on a GPU node, before a long job (``scripts/gpu_check.py``).

1. The environment: GPU, CUDA, transformer-engine, and the tested megatron-core / ModelOpt.
2. The tiny pipeline end to end on one GPU in bf16 (the demo, shortened, in its own run folder):
   import, teacher pre-training, depth and width pruning, logits, distillation, eval, export,
   through the same stage runner as ``make pipeline``, with the TE spec when TE is installed.
3. Attention at Llama-3.1-8B's shape (32 query heads in 8 groups, head size 128) at sequence
   8192, in bfloat16 and float32 (:func:`attention_paths`): torch's fused kernels only (its math
   kernel, which builds the ``[b, H, s, s]`` scores, is disallowed, so a fallback to it fails the
   part), which path :class:`pipelines.ops.attention.SDPAttention` took (grouped keys to the kernel, or
   repeated per query head), the peak memory of the forward and backward pass, and the values and
   gradients against megatron's unfused attention on a shorter sequence.
4. A real-shaped slice: 2 layers at Llama-3.1-8B's width (hidden 4096, MLP 14336, 32 heads, 8
   KV groups, vocabulary 128,256) at sequence 8192, imported from a random Hugging Face folder and
   trained a few steps by the distill trainer, then the logits stage's forward and top-k on one
   sequence; it reports tokens/s and the peak memory allocated of both against
   :mod:`pipelines.launch.memory_plan`'s prediction for the same shapes, and how many times a training
   step made the host wait for the GPU.

On a machine without a GPU it says so and exits with status 2: it never passes silently. The
figures go to ``<paths.runs>/gpu_check/result.json``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from pipelines.backend import distributed, kernels
from pipelines.core.errors import UserError
from pipelines.core.experiment import REPO
from pipelines.launch import memory_plan
from pipelines.model import build as model_lib
from pipelines.model.build import local_logits
from pipelines.ops.kd_loss import teacher_sampled, teacher_topk
from pipelines.tools.cluster_check import make_model
from pipelines.training.plan import Plan
from pipelines.training.trainer import Trainer

SLICE = {"num_layers": 2, "hidden_size": 4096, "ffn_hidden_size": 14336, "num_attention_heads": 32,
         "num_query_groups": 8, "kv_channels": 128, "vocab_size": 128256, "max_position_embeddings": 8192}
SLICE_SEQUENCE, SLICE_STEPS, SLICE_GLOBAL_BATCH = 8192, 6, 4
# the demo, shortened: every stage runs, in minutes
TINY_ARGS = ["correct.train_steps=60", "correct.eval_interval=30", "correct.save_interval=30",
             "distill.train_steps=30", "distill.eval_interval=15", "distill.save_interval=15",
             "prune.calib_samples=16", "eval.limit=1"]


def slice_model(model_cfg) -> dict:
    """A config's ``model`` section at Llama-3.1-8B's width (:data:`SLICE`)."""
    from omegaconf import OmegaConf

    return {**OmegaConf.to_container(model_cfg), **SLICE}


def environment() -> dict:
    import torch


    if not torch.cuda.is_available():
        raise UserError("no GPU on this machine (torch.cuda.is_available() is False): gpu-check needs one; "
                        "run it on a GPU node, e.g. make gpu-check PYTHON=python inside the container",
                        "the machine")
    distributed.check_versions()
    properties = torch.cuda.get_device_properties(0)
    from importlib.metadata import version

    return {"gpu": properties.name, "gpu_memory_gb": properties.total_memory / 1e9,
            "gpus": torch.cuda.device_count(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "transformer_engine": kernels.transformer_engine_available(),
            "megatron_core": version("megatron-core"), "modelopt": version("nvidia-modelopt")}


def tiny_pipeline(runs: Path) -> dict:
    """The shortened demo on one GPU, as a user runs it (a fresh run folder each time)."""
    started = time.perf_counter()
    command = [sys.executable, "scripts/stage.py", "pipeline", "experiment=demo", "run.name=gpu_check_tiny",
               f"paths.runs={runs}", "force=true", *TINY_ARGS]
    print(f"[gpu-check] tiny pipeline: {' '.join(command)}", flush=True)
    result = subprocess.run(command, cwd=REPO)
    if result.returncode != 0:
        raise RuntimeError(f"the tiny pipeline failed (status {result.returncode}); its output is above")
    report = json.loads((runs / "gpu_check_tiny" / "report.json").read_text())
    return {"seconds": time.perf_counter() - started, "report": report}


def real_slice(folder: Path, data: Path) -> dict:
    """A few distill steps of a 2-layer slice at Llama-3.1-8B's width, sequence 8192."""
    import torch
    from hydra import compose, initialize_config_dir


    repo = REPO
    with initialize_config_dir(str(repo / "configs"), version_base="1.3"):
        base = compose("pipeline")
    model = slice_model(base.model)
    checkpoint = make_model(folder, model, "slice")
    overrides = [f"data.output={data}", f"distill.student={checkpoint}", "distill.teacher=none",
                 "distill.kd_weight=0", f"distill.output={folder / 'slice_out'}",
                 f"distill.sequence_length={SLICE_SEQUENCE}", "distill.micro_batch_size=1",
                 f"distill.global_batch_size={SLICE_GLOBAL_BATCH}", "distill.train_steps=100"]
    with initialize_config_dir(str(repo / "configs"), version_base="1.3"):
        cfg = compose("pipeline", overrides=overrides)
    layout = distributed.initialize(cfg.parallel)
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
    syncs = _host_syncs(trainer.train_step)
    arch = model_lib.architecture(model)
    fused = kernels.transformer_engine_available()
    estimate = memory_plan.training(
        arch, sequence=SLICE_SEQUENCE, micro_batch=1, microbatches=SLICE_GLOBAL_BATCH, tensor=1, pipeline=1,
        data=1, element_bytes=2, distributed_optimizer=bool(cfg.distill.distributed_optimizer),
        fused=fused, chunk_tokens=int(cfg.distill.chunk_tokens), gpu=False)
    result = {"step_seconds_median": step, "step_seconds": times,
              "tokens_per_s": SLICE_GLOBAL_BATCH * SLICE_SEQUENCE / step,
              "peak_allocated_gb": peak / 1e9, "predicted_gb": estimate.total / 1e9,
              "predicted_parts_gb": {k: v / 1e9 for k, v in estimate.parts.items()},
              "prediction_error": abs(estimate.total - peak) / peak, "dtype": str(trainer.dtype),
              "transformer_engine": fused, "host_syncs_per_step": syncs}
    result["logits"] = _slice_logits(trainer, arch)
    return result


def attention_paths(arch: dict, device, sequence: int = SLICE_SEQUENCE, check_sequence: int = 1024,
                    dtypes: tuple = ("bfloat16", "float32")) -> dict:
    """:class:`pipelines.ops.attention.SDPAttention` at ``arch``'s attention shape, one sequence, per
    dtype: forward and backward under torch's fused kernels only (flash, memory-efficient, cuDNN; a
    fallback to the math kernel raises), the path taken, the median time of 3 and, on a GPU, the
    peak memory above the inputs against one float32 ``[1, H, s, s]`` scores tensor; then the
    values and the three input gradients on the first ``check_sequence`` positions against
    megatron's unfused ``DotProductAttention`` in float32. Raises when a check fails."""
    import torch
    from megatron.core.transformer.enums import AttnMaskType
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from pipelines.ops import attention  # loads megatron, as the imports above

    heads, groups, size = arch["num_attention_heads"], arch["num_query_groups"], arch["kv_channels"]
    fused_only = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
    on_gpu = torch.device(device).type == "cuda"
    results = {}
    for name in dtypes:
        dtype = getattr(torch, name)
        module = attention.SDPAttention(model_lib.transformer_config(arch, dtype, device=device), layer_number=1,
                                        attn_mask_type=AttnMaskType.causal, attention_type="self")
        generator = torch.Generator(device=device).manual_seed(0)
        inputs = [torch.randn(sequence, 1, count, size, device=device, dtype=dtype, generator=generator)
                  for count in (heads, groups, groups)]   # query, key, value: [s, b, heads, d]
        grad = torch.randn(sequence, 1, heads * size, device=device, dtype=dtype, generator=generator)
        mask = model_lib.causal_mask(sequence, device)
        grouped = attention.kernel_takes_groups(*(x.permute(1, 2, 0, 3) for x in inputs))
        times, peak = [], None
        for _ in range(3):
            leaves = [x.detach().requires_grad_() for x in inputs]
            if on_gpu:
                torch.cuda.synchronize()
                baseline = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            started = time.perf_counter()
            with sdpa_kernel(fused_only):
                module(*leaves, attention_mask=mask).backward(grad)
            if on_gpu:
                torch.cuda.synchronize()
                peak = torch.cuda.max_memory_allocated() - baseline
            times.append(time.perf_counter() - started)
        scores = heads * sequence * sequence * 4
        figures = {"path": "grouped" if grouped else "repeated", "seconds_median": sorted(times)[1],
                   "peak_above_inputs_gb": None if peak is None else peak / 1e9, "scores_gb": scores / 1e9}
        figures["max_error"] = _attention_error(arch, module, inputs, grad, check_sequence)
        results[name] = figures
        if peak is not None and peak > scores / 4:
            raise RuntimeError(f"attention in {name} peaked {peak / 1e9:.2f} GB above its inputs: the "
                               f"[1, {heads}, {sequence}, {sequence}] scores ({scores / 1e9:.1f} GB in float32) "
                               f"look materialised")
        tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-4
        if figures["max_error"] > tolerance:
            raise RuntimeError(f"attention in {name} differs from megatron's unfused attention by "
                               f"{figures['max_error']:.2e} (relative to the largest value; tolerance {tolerance})")
    return results


def _attention_error(arch: dict, module, inputs, grad, count: int) -> float:
    """The largest difference, over the output and the three input gradients (each relative to its
    largest magnitude), between ``module`` and megatron's unfused attention in float32 on the first
    ``count`` positions (causal: they see nothing past them)."""
    import torch
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType


    reference = DotProductAttention(model_lib.transformer_config(arch, torch.float32, device=inputs[0].device),
                                    layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
    mask = model_lib.causal_mask(count, inputs[0].device)
    results = []
    for attend, dtype in ((module, inputs[0].dtype), (reference, torch.float32)):
        leaves = [x[:count].detach().to(dtype).requires_grad_() for x in inputs]
        out = attend(*leaves, attention_mask=mask)
        out.backward(grad[:count].to(dtype))
        results.append([t.detach().float() for t in (out, *(x.grad for x in leaves))])
    return max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(*results))


def _host_syncs(step) -> int:
    """How many times one call of ``step`` made the host wait for the GPU (torch's sync debug
    mode warns at each). The forward and backward passes make none (a CPU test checks it); the
    optimizer's gradient clipping one, the metrics' read one, whatever else is counted here."""
    import warnings

    import torch

    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def _slice_logits(trainer, arch: dict) -> dict:
    """The logits stage's forward and its labels on the slice (one sequence), top-64 and 64
    sampled (the default), each: median time of 3 and peak against the plan."""
    import torch


    model = trainer.model
    model.eval()
    trainer.optimizer.zero_grad()
    torch.cuda.empty_cache()
    device = trainer.layout.device
    tokens = torch.randint(0, arch["vocab_size"], (1, SLICE_SEQUENCE), device=device)
    split = dict(vocab_size=arch["vocab_size"], chunk_tokens=1024)
    labels = {"topk": lambda logits: teacher_topk(logits, 64, 1.0, **split),
              "sampled": lambda logits: teacher_sampled(logits, 64, 1.0, torch.Generator(device=device).manual_seed(0),
                                                        **split)}
    result = {}
    for mode, label in labels.items():
        torch.cuda.empty_cache()
        baseline = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(3):
            torch.cuda.synchronize()
            started = time.perf_counter()
            with torch.no_grad():
                ids, _, _ = label(local_logits(model, tokens))
            torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
        extra = torch.cuda.max_memory_allocated() - baseline
        estimate = memory_plan.forward(arch, sequence=SLICE_SEQUENCE, batch=1, tensor=1, element_bytes=2,
                                       chunk_tokens=1024, sampled=mode == "sampled")
        predicted = estimate.parts["forward peak"]   # above the weights, without the framework allowance
        figures = {"seconds_median": sorted(times)[1], "tokens_per_s": SLICE_SEQUENCE / sorted(times)[1],
                   "peak_above_resident_gb": extra / 1e9, "predicted_above_weights_gb": predicted / 1e9,
                   "predicted_parts_gb": {k: v / 1e9 for k, v in estimate.parts.items()},
                   "ids_in_vocab": bool((ids < arch["vocab_size"]).all())}
        result[mode] = figures
    return {**result["topk"], **result}   # at the top level, the top-k's: the keys earlier runs wrote


PARTS = ("tiny", "attention", "slice")


def main(argv: list[str]) -> None:
    """``gpu_check.py [--part tiny|slice] [key=value ...]``: the pipeline overrides (e.g. ``paths.runs=...``).

    Each part runs even when an earlier one failed; the figures and errors of all go to
    ``result.json`` (merged with an earlier run's), and the status is 1 when any part failed.
    """
    from hydra import compose, initialize_config_dir

    parts = list(PARTS)
    if "--part" in argv:
        at = argv.index("--part")
        parts, argv = argv[at + 1:at + 2], argv[:at] + argv[at + 2:]
        if not parts or parts[0] not in PARTS:
            raise UserError(f"--part takes one of {', '.join(PARTS)}", "--part")
    repo = REPO
    facts = environment()
    print("[gpu-check] " + ", ".join(f"{k} {v}" for k, v in facts.items()), flush=True)
    with initialize_config_dir(str(repo / "configs"), version_base="1.3"):
        cfg = compose("pipeline", overrides=["experiment=demo", *argv])
    runs = Path(str(cfg.paths.runs)).resolve()
    output = runs / "gpu_check" / "result.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    result = json.loads(output.read_text()) if output.exists() else {}
    result["environment"] = facts
    failed = []
    for part in parts:
        try:
            if part == "tiny":
                result["tiny"] = tiny_pipeline(runs)
                print(f"[gpu-check] tiny pipeline passed in {result['tiny']['seconds']:.0f} s", flush=True)
            elif part == "attention":

                layout = distributed.initialize(cfg.parallel)
                arch = model_lib.architecture(slice_model(cfg.model))
                result["attention"] = paths = attention_paths(arch, layout.device, sequence=SLICE_SEQUENCE,
                                                              check_sequence=min(1024, SLICE_SEQUENCE))
                print("[gpu-check] attention at 8B's shape (32 heads in 8 groups, sequence "
                      f"{SLICE_SEQUENCE}), fused kernels only: " + "; ".join(
                          f"{name} {f['path']} keys, {f['seconds_median'] * 1e3:.1f} ms forward and backward, "
                          + ("peak not measured" if f["peak_above_inputs_gb"] is None else
                             f"peak {f['peak_above_inputs_gb']:.2f} GB above the inputs")
                          + f" (scores would be {f['scores_gb']:.1f} GB), {f['max_error']:.1e} from megatron's"
                          for name, f in paths.items()), flush=True)
            else:
                data = Path(str(cfg.data.output)).resolve()
                result["slice"] = figures = real_slice(runs / "gpu_check", data)
                logits = figures["logits"]
                print(f"[gpu-check] 8B-width slice (2 layers, sequence {SLICE_SEQUENCE}, {figures['dtype']}): "
                      f"{figures['tokens_per_s']:,.0f} tokens/s, peak allocated {figures['peak_allocated_gb']:.1f} GB, "
                      f"memory plan {figures['predicted_gb']:.1f} GB ({figures['prediction_error']:.0%} off), "
                      f"{figures['host_syncs_per_step']} host syncs per step; "
                      + "; ".join(f"logits forward + {mode} labels {logits[mode]['tokens_per_s']:,.0f} tokens/s, "
                                  f"{logits[mode]['peak_above_resident_gb']:.2f} GB above the resident state "
                                  f"(plan {logits[mode]['predicted_above_weights_gb']:.2f} GB)"
                                  for mode in ("topk", "sampled")), flush=True)
        except Exception as error:  # noqa: BLE001  (every part is reported; the status says it failed)
            import traceback

            traceback.print_exc()
            result[part] = {"failed": f"{type(error).__name__}: {error}"}
            failed.append(part)
            print(f"[gpu-check] {part} FAILED: {type(error).__name__}: {error}", flush=True)
        output.write_text(json.dumps(result, indent=2, default=str))
    if failed:
        raise SystemExit(f"[gpu-check] failed: {', '.join(failed)}; figures and errors in {output}")
    print(f"[gpu-check] passed; figures in {output}", flush=True)
