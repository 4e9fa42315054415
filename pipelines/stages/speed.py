"""The speed stage: inference speed and memory of every model of the run (``eval.speed``).

``scripts/speed.py``; ``make eval`` runs it after the eval stage. Every finished model (teacher,
distilled students; a pruned student has its distilled student's shape and speed) is exported to
Hugging Face in a scratch folder and timed in this one process through transformers
(:mod:`pipelines.evaluation.speed`). Quantized exports get their bytes and memory; their speed
is "not measurable" here: transformers runs them fake-quantized (slower than bf16, not what an
engine's FP8 or INT4 kernels do), so a figure would mislead. ``eval.speed.backend=vllm`` is
refused until it is wired in.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

from omegaconf import OmegaConf

from pipelines.core.artifacts import config_hash, read_json, sha256_file, write_json
from pipelines.core.errors import require
from pipelines.core.experiment import model_label, model_path
from pipelines.evaluation.speed import BYTES, kv_cache_bytes, measure
from pipelines.hf.convert import SINGLE_PROCESS, export_to
from pipelines.model.build import count_parameters
from pipelines.model.checkpoint import DTYPES, read_architecture
from pipelines.stages.base import Stage
from pipelines.stages.eval import models_in_run
from pipelines.stages.rules import positive_whole

REASON_QUANTIZED = ("not measurable with transformers: it runs FP8 / INT4 fake-quantized, not with an "
                    "engine's kernels (eval.speed.backend=vllm on a GPU)")


def timed_models(cfg) -> dict[str, Path]:
    """``{label: checkpoint}`` of the models the stage times, and of the quantized ones it sizes."""
    run_dir = Path(str(cfg.run.dir))
    found = {}
    for model, student in models_in_run(run_dir):
        if model == "pruned":
            continue
        found[model_label(model, student)] = Path(model_path(model, str(run_dir), student))
    return found


def speed_inputs(cfg) -> dict:
    models = timed_models(cfg)
    require(models, f"no finished model in {cfg.run.dir} to time", "run.name")
    stamps = {}
    for name, folder in models.items():
        manifest = folder / "manifest.json" if (folder / "manifest.json").exists() else folder.parent / "manifest.json"
        stamps[name] = sha256_file(manifest)
    import torch

    return {"models": stamps, "device": "cuda" if torch.cuda.is_available() else "cpu",
            "speed": config_hash({k: v for k, v in OmegaConf.to_container(cfg.eval.speed).items() if k != "output"})}


def checks(cfg, arch, layout) -> None:
    s = cfg.eval.speed
    require(str(s.backend) in ("transformers", "vllm"), f"eval.speed.backend={s.backend} is not transformers "
            "or vllm", "eval.speed.backend")
    if str(s.backend) == "vllm":
        installed = importlib.util.find_spec("vllm") is not None
        require(False, "eval.speed.backend=vllm: " + ("vLLM is installed, but this stage does not drive it yet; "
                "use transformers" if installed else "vLLM is not installed here (pip install vllm, on a GPU host)"),
                "eval.speed.backend")
    for key, least in (("prompt_length", 1), ("decode_tokens", 2), ("batch", 1), ("repeats", 1), ("context", 1)):
        positive_whole(s[key], f"eval.speed.{key}", least, inclusive=True)
    require(str(s.dtype) in DTYPES, f"eval.speed.dtype {s.dtype} is not one of {sorted(DTYPES)}", "eval.speed.dtype")
    if arch is not None:
        longest = int(s.prompt_length) + int(s.decode_tokens)
        require(longest <= int(arch["max_position_embeddings"]), f"eval.speed.prompt_length + decode_tokens = "
                f"{longest} exceeds the model's {arch['max_position_embeddings']} positions", "eval.speed.prompt_length")


def run(cfg, layout, staging: Path, inputs: dict) -> dict:
    from pipelines.quantization.ptq import load_hf

    s = cfg.eval.speed
    serving = DTYPES[str(s.dtype)]
    element = BYTES[serving]
    loaded, results = {}, {}
    for name, folder in timed_models(cfg).items():
        if (folder / "hf_quant_config.json").exists():
            made = read_json(folder.parent / "quantize_report.json", "eval.checkpoint")
            arch = made["architecture"]
            weights = made["formats"][folder.name]["bytes"]
            results[name] = {"speed": None, "speed_note": REASON_QUANTIZED}
        else:
            arch, _ = read_architecture(folder, "eval.checkpoint")
            hf = staging / "hf" / name
            hf.mkdir(parents=True)
            export_to(folder, hf, layout)
            loaded[name] = load_hf(hf, layout.compute_dtype, layout)
            weights = count_parameters(arch) * element
            results[name] = {}
        kv = kv_cache_bytes(arch, int(s.context), int(s.batch), element)
        results[name].update({"params": count_parameters(arch), "weight_bytes": weights, "kv_cache_bytes": kv,
                              "memory_bytes": weights + kv})
    print(f"[speed] timing {', '.join(loaded)} on {layout.device} ({layout.compute_dtype}), prompt "
          f"{s.prompt_length}, {s.decode_tokens} new tokens, batch 1 and {s.batch}, {s.repeats} repeats", flush=True)
    for name, figures in measure(loaded, s, layout).items():
        results[name]["speed"] = figures
    del loaded
    shutil.rmtree(staging / "hf", ignore_errors=True)
    summary = {"device": str(layout.device), "compute_dtype": str(layout.compute_dtype).replace("torch.", ""),
               "memory_dtype": str(serving).replace("torch.", ""), "context": int(s.context), "batch": int(s.batch),
               "prompt_length": int(s.prompt_length), "decode_tokens": int(s.decode_tokens),
               "repeats": int(s.repeats), "backend": str(s.backend), "models": results}
    write_json(staging / "results.json", summary)
    for name, entry in results.items():
        figures = entry.get("speed")
        line = (f"decode {figures['decode_tokens_per_s_batch1']['median']:.1f} tok/s at batch 1, "
                f"prefill {figures['prefill_tokens_per_s']['median']:.0f} tok/s" if figures else entry["speed_note"])
        print(f"[speed] {name}: {line}; memory {entry['memory_bytes'] / 1e6:,.1f} MB at {s.context} tokens x "
              f"{s.batch}", flush=True)
    return {"models": sorted(results), "device": str(layout.device)}


def runtime(cfg):
    from pipelines.backend import distributed

    return distributed.initialize(SINGLE_PROCESS, reuse_freed_memory=False)


STAGE = Stage(name="speed", output=lambda cfg: Path(str(cfg.eval.speed.output)), inputs=speed_inputs, run=run,
              checks=checks, runtime=runtime, output_key="eval.speed.output")
