"""Post-training quantization of a Hugging Face Llama with ModelOpt, exported for serving engines.

:func:`quantize_export` loads a student's Hugging Face export, calibrates ModelOpt's quantizers
on token batches of the run's own training data (``mtq.quantize``), and writes ModelOpt's unified
Hugging Face checkpoint (``export_hf_checkpoint``: quantized weights and scales in safetensors,
``hf_quant_config.json`` and ``quantization_config`` in ``config.json``), the layout vLLM,
TensorRT-LLM and SGLang load. It then reads that export back (:mod:`pipelines.quantization.load`)
and compares its logits with the fake-quantized and the unquantized model's, so a broken export
stops the stage.

Two things make the export work on CPU, where it failed for a hand-built model: the model's
config names its architecture (``LlamaForCausalLM``: ModelOpt's dummy forward reads it), and the
export dtype is passed as a ``torch.dtype`` (a string dtype from the config reaches
``Tensor.to`` as a device name).
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import torch

from pipelines.core.errors import require
from pipelines.ops.masks import hf_batch
from pipelines.quantization.load import is_scale, load_fake_quantized

# quantize.formats entry -> (ModelOpt config name, needs a GPU, the weight bits serving engines store)
FORMATS = {
    "fp8": ("FP8_DEFAULT_CFG", False, 8),
    "int4_awq": ("INT4_AWQ_CFG", False, 4),
    "int8_sq": ("INT8_SMOOTHQUANT_CFG", False, 8),
    "w4a8_awq": ("W4A8_AWQ_BETA_CFG", False, 4),
    "nvfp4": ("NVFP4_DEFAULT_CFG", True, 4),   # ModelOpt: "amax must be a CUDA tensor" on CPU
}


def check_formats(formats, on_gpu: bool, key: str = "quantize.formats") -> list[str]:
    """The formats as a list of names, each known and runnable on this device."""
    names = [str(f) for f in formats]
    unknown = [f for f in names if f not in FORMATS]
    require(not unknown, f"unknown format {unknown}; one of {', '.join(FORMATS)}", key)
    require(len(set(names)) == len(names), f"a format is listed twice: {names}", key)
    gpu_only = [f for f in names if FORMATS[f][1] and not on_gpu]
    require(not gpu_only, f"{gpu_only} runs only on a GPU (ModelOpt computes its block scales with CUDA); "
            "drop it or run the stage on a GPU host", key)
    return names


def input_widths(arch) -> dict[str, int]:
    """The input width of each kind of linear layer of a Llama architecture."""
    return {"hidden_size (q/k/v, gate/up)": int(arch["hidden_size"]),
            "heads x kv_channels (o_proj)": int(arch["num_attention_heads"]) * int(arch["kv_channels"]),
            "ffn_hidden_size (down_proj)": int(arch["ffn_hidden_size"])}


def group_size(setting, arch, key: str = "quantize.group_size") -> int:
    """The INT4 block size: ``setting``, or with ``auto`` the largest power of two up to 128 that
    divides every linear layer's input width. A block must divide the width: ModelOpt's fake
    quantization pads the last block while its exporter packs by ``width // blocks``, so the two
    disagree (and engines' INT4 kernels take whole groups only)."""
    widths = input_widths(arch)
    if str(setting) == "auto":
        size = next((g for g in (128, 64, 32, 16, 8) if all(w % g == 0 for w in widths.values())), None)
        require(size is not None, f"no INT4 group of 8 to 128 divides the input widths {widths}; "
                "drop int4_awq / w4a8_awq for this student", key)
        return size
    size = int(setting)
    bad = {name: width for name, width in widths.items() if width % size}
    require(size > 0 and not bad, f"{key}={size} does not divide the input widths {bad}", key)
    return size


def modelopt_config(fmt: str, group: int) -> dict:
    """ModelOpt's config for ``fmt``, with INT4 blocks of ``group`` input columns."""
    import modelopt.torch.quantization as mtq

    config = copy.deepcopy(getattr(mtq, FORMATS[fmt][0]))
    if FORMATS[fmt][2] == 4 and fmt != "nvfp4":
        weight = config["quant_cfg"]["*weight_quantizer"]
        for quantizer in weight if isinstance(weight, list) else [weight]:
            if quantizer.get("num_bits") == 4:
                quantizer["block_sizes"] = {**quantizer["block_sizes"], -1: group}
    return config


def load_hf(folder: Path, dtype: torch.dtype, layout):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa")
    model.config.architectures = ["LlamaForCausalLM"]
    return layout.place_module(model).eval()


def store_unquantized_as(folder: Path, dtype: torch.dtype) -> None:
    """Rewrite the export's unquantized float tensors (norms, embeddings, unquantized layers) in
    ``dtype``; scales stay float32, quantized weights as they are. Lossless here: those tensors
    were rounded to ``dtype`` before calibration."""
    from safetensors.torch import load_file, save_file

    for path in sorted(folder.glob("*.safetensors")):
        tensors = load_file(path)
        changed = {k: (v.to(dtype) if v.dtype == torch.float32 and not is_scale(k) else v)
                   for k, v in tensors.items()}
        save_file(changed, path, metadata={"format": "pt"})
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    for key in ("dtype", "torch_dtype"):
        if key in config:
            config[key] = str(dtype).replace("torch.", "")
    config_path.write_text(json.dumps(config, indent=2))


def mean_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().mean().item()


def quantize_export(hf_dir: Path, fmt: str, calibration: list[tuple], check: tuple,
                    output: Path, export_dtype: torch.dtype, layout, group: int = 128) -> dict:
    """Quantize the Hugging Face model ``hf_dir`` to ``fmt`` and export it into ``output``.

    ``calibration``: ``(tokens [b, s], conversation starts [b, s] or None)`` batches for the
    quantizers' ranges (and AWQ's search); ``check``: one such batch the export is compared on;
    ``layout``: the runtime's (device and compute dtype). Returns the format's report.
    """
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint
    from modelopt.torch.export.unified_export_hf import requantize_resmooth_fused_llm_layers

    started = time.perf_counter()
    compute_dtype = layout.compute_dtype
    # what stays unquantized is shipped in export_dtype: round it so now, so that the calibrated
    # model, the check's reference and the unquantized baseline are the model the export holds
    model = load_hf(hf_dir, export_dtype, layout).to(compute_dtype)
    model.config.dtype = compute_dtype
    # loading in bfloat16 also rounded RoPE's inverse frequencies, which engines keep in float32
    model.model.rotary_emb = layout.place_module(type(model.model.rotary_emb)(model.config))
    check = hf_batch(*layout.place(check), compute_dtype)
    with torch.no_grad():
        unquantized = model(**check).logits

    def forward_loop(module):
        with torch.no_grad():
            for tokens, starts in calibration:
                module(**hf_batch(*layout.place((tokens, starts)), compute_dtype))

    mtq.quantize(model, modelopt_config(fmt, group), forward_loop)
    # the export shares one input scale among layers that read the same input (q/k/v, gate/up) and
    # folds AWQ's pre-quantization scales into the norm before them, as engines fuse those GEMMs;
    # the reference is the fake-quantized model after that step
    reference = copy.deepcopy(model)
    requantize_resmooth_fused_llm_layers(reference)
    with torch.no_grad():   # the norms that took AWQ / SmoothQuant scales are shipped in export_dtype too
        for name, parameter in reference.named_parameters():
            if "norm" in name:
                parameter.copy_(parameter.to(export_dtype))
    with torch.no_grad():
        quantized = reference(**check).logits
    del reference
    # exported in the compute dtype: with bfloat16, ModelOpt divides the weights by their scales in
    # bfloat16 before rounding to FP8, which rounds twice and departs from the calibrated model
    export_hf_checkpoint(model, dtype=compute_dtype, export_dir=output)
    del model
    store_unquantized_as(output, export_dtype)
    loaded, algo = load_fake_quantized(output, compute_dtype, layout)
    with torch.no_grad():
        exported = loaded(**check).logits
    error, drift = mean_abs(quantized, unquantized), mean_abs(exported, quantized)
    exported_error = mean_abs(exported, unquantized)
    # The export and ModelOpt's fake quantization round some weights apart: a bfloat16 weight over a
    # bfloat16 amax / 448 often lands exactly between two FP8 values, and ModelOpt's fake FP8 rounds
    # that tie away from zero while the float8_e4m3fn cast the exporter uses rounds it to even (42 ->
    # 44 against 40; on SmolLM2's bf16 weights the drift nears the quantization's own change). The
    # export is what engines compute and what eval scores, so it is held to
    # the calibrated model's own error, not to its logits: a broken export (wrong packing, scale or
    # layout) is far further from the unquantized model than the quantization itself.
    require(exported_error <= 1.5 * error + 1e-5, f"the {fmt} export read back moves the logits by "
            f"{exported_error:.3g} mean |logit|, against {error:.3g} for the fake-quantized model it was "
            "exported from", "quantize.formats")
    files = sorted(output.glob("*.safetensors"))
    return {"format": fmt, "quant_algo": algo, "weight_bits": FORMATS[fmt][2],
            "group_size": group if FORMATS[fmt][2] == 4 else None,
            "bytes": sum(p.stat().st_size for p in files),
            "calibration_tokens": sum(int(tokens.numel()) for tokens, _ in calibration),
            "logit_error": error, "export_logit_error": exported_error, "export_logit_drift": drift,
            "quant_config": json.loads((output / "hf_quant_config.json").read_text())["quantization"],
            "seconds": time.perf_counter() - started}
