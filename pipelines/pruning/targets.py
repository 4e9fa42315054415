"""Deployment targets of ``prune=search``: decode latency and serving memory, beside the parameter budget.

``prune.target_memory_gb`` holds a shape's weights in ``prune.memory.format`` (bf16, fp8, int4:
the tensors ModelOpt's unified export writes, see :func:`weight_bytes`) plus its bf16 KV cache at
``prune.memory.context`` tokens for ``prune.memory.batch`` sequences. It is counted, not measured,
and needs no model.

``prune.target_latency`` is milliseconds per decode step (one new token for each of
``prune.latency.batch`` sequences, after a ``prune.latency.context``-token prefill), measured on
the device the prune stage runs on, through transformers as ``eval.speed`` times models. Timing
needs no trained weights: each shape is a Llama of random weights. A grid of at most
``prune.latency.whole_limit`` shapes is timed shape by shape. A larger one is timed in parts
(:class:`PartModel`): for each layer width, a one-layer model and one as deep as the grid's
deepest shape of that width give the width's cost per layer and the rest (embedding, output
layer, the step's fixed cost); a shape's latency is the rest plus its layers. Before that model is used it is checked against
whole-model timings of ``prune.latency.check_shapes`` shapes of the grid (the largest, the
smallest and seeded others); a relative error above ``prune.latency.max_error`` stops the stage.

The timings are kept in the candidates folder (``latency.json``, keyed by device and settings),
so a resumed stage ranks the same candidates.
"""

from __future__ import annotations

import random
import statistics
from pathlib import Path

import torch

from pipelines.core.artifacts import config_hash, read_json, write_json
from pipelines.core.errors import require
from pipelines.evaluation.speed import decode_seconds, kv_cache_bytes
from pipelines.model.build import count_parameters

MEMORY_FORMATS = ("bf16", "fp8", "int4")
PART_LAYERS = 2          # the fewest layers of the deeper model of a width's pair


def linear_shapes(arch: dict) -> list[tuple[int, int, str]]:
    """``(in, out, name)`` of one layer's linear layers."""
    hidden, ffn = int(arch["hidden_size"]), int(arch["ffn_hidden_size"])
    heads, groups, head_dim = int(arch["num_attention_heads"]), int(arch["num_query_groups"]), int(arch["kv_channels"])
    return [(hidden, heads * head_dim, "q_proj"), (hidden, groups * head_dim, "k_proj"),
            (hidden, groups * head_dim, "v_proj"), (heads * head_dim, hidden, "o_proj"),
            (hidden, ffn, "gate_proj"), (hidden, ffn, "up_proj"), (ffn, hidden, "down_proj")]


def weight_bytes(arch: dict, fmt: str, group_size: int | None = None) -> int:
    """The bytes of the weights as the export in ``fmt`` stores them.

    ``bf16``: every parameter in two bytes (the Hugging Face export). ``fp8`` (ModelOpt's FP8
    export): linear weights in one byte with a float32 weight and input scale each; embedding,
    output layer and norms in bf16. ``int4`` (INT4-AWQ): linear weights packed two to a byte, a
    float32 scale per ``group_size`` inputs of each output, and float32 AWQ input scales on the
    layers whose input is not a norm's output (``o_proj``, ``down_proj``: the others are folded
    into the norms); embedding, output layer and norms in bf16.
    """
    require(fmt in MEMORY_FORMATS, f"unknown memory format {fmt!r}; one of {MEMORY_FORMATS}", "prune.memory.format")
    total = count_parameters(arch)
    if fmt == "bf16":
        return 2 * total
    layers = int(arch["num_layers"])
    shapes = linear_shapes(arch)
    linear = layers * sum(i * o for i, o, _ in shapes)
    rest = 2 * (total - linear)
    if fmt == "fp8":
        return rest + linear + layers * len(shapes) * 2 * 4
    require(group_size is not None and all(i % group_size == 0 for i, _, _ in shapes),
            f"int4 group size {group_size} does not divide every layer's input width", "quantize.group_size")
    scales = layers * sum(o * (i // group_size) for i, o, _ in shapes) * 4
    awq = layers * sum(i for i, _, n in shapes if n in ("o_proj", "down_proj")) * 4
    return rest + linear // 2 + scales + awq


def memory_bytes(arch: dict, memory, group_size: int | None = None) -> int:
    """:func:`weight_bytes` in ``memory.format`` plus the bf16 KV cache at ``memory.context`` x ``memory.batch``."""
    return weight_bytes(arch, str(memory.format), group_size) + kv_cache_bytes(arch, int(memory.context),
                                                                              int(memory.batch), 2)


# --- latency -------------------------------------------------------------------------------------

def random_llama(arch: dict, layout):
    """A transformers Llama of ``arch`` with random weights, built on ``layout``'s device in its dtype."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipelines.hf.llama_map import hf_config

    dtype = layout.compute_dtype
    config = LlamaConfig(**{**hf_config(arch, dtype), "use_cache": True})
    config._attn_implementation = "sdpa"
    with torch.device(layout.device):
        model = LlamaForCausalLM._from_config(config, torch_dtype=dtype)
    return model.eval()


def step_ms(model, latency, layout) -> float:
    """Milliseconds of one decode step of ``model`` at ``latency.batch`` after a
    ``latency.context``-token prefill: the fastest of ``latency.repeats`` timings after a warm-up
    (other work on the device only ever slows a step, so the fastest is the steadiest figure)."""
    batch, context = int(latency.batch), int(latency.context)
    tokens = int(latency.decode_tokens)
    generator = torch.Generator().manual_seed(0)
    prompt = layout.place(torch.randint(0, model.config.vocab_size, (batch, context), generator=generator))
    times = []
    with torch.inference_mode():
        for repeat in range(int(latency.repeats) + 1):
            seconds = decode_seconds(model, prompt, tokens, layout.device)
            if repeat:
                times.append(1000 * seconds / tokens)
    return min(times)


def time_shape(arch: dict, latency, layout) -> float:
    model = random_llama(arch, layout)
    try:
        return step_ms(model, latency, layout)
    finally:
        del model
        if layout.device.type == "cuda":
            torch.cuda.empty_cache()


def width_key(shape: dict) -> tuple[int, int, int]:
    return int(shape["hidden_size"]), int(shape["ffn_hidden_size"]), int(shape["num_attention_heads"])


class PartModel:
    """Latency as the sum of parts: per layer width, ``rest + layers x per_layer`` from a one-layer
    model and the grid's deepest of that width."""

    def __init__(self, parts: dict):
        self.parts = parts   # "h,f,a" -> {"rest": ms, "per_layer": ms}

    @classmethod
    def timed(cls, shapes: list[dict], latency, layout, log=print) -> PartModel:
        deepest: dict[tuple, dict] = {}
        for shape in shapes:   # per width, the deepest shape of the grid: its layer counts are interpolated
            key = width_key(shape)
            if key not in deepest or shape["num_layers"] > deepest[key]["num_layers"]:
                deepest[key] = shape
        widths = sorted(deepest.items())
        parts = {}
        for number, (key, shape) in enumerate(widths, 1):
            layers = max(PART_LAYERS, int(shape["num_layers"]))
            one = time_shape({**shape, "num_layers": 1}, latency, layout)
            deep = time_shape({**shape, "num_layers": layers}, latency, layout)
            per_layer = max(0.0, (deep - one) / (layers - 1))
            parts[",".join(map(str, key))] = {"rest": one - per_layer, "per_layer": per_layer}
            if number % 10 == 0 or number == len(widths):
                log(f"[prune] latency parts: {number}/{len(widths)} layer widths timed", flush=True)
        return cls(parts)

    def __call__(self, shape: dict) -> float:
        part = self.parts[",".join(map(str, width_key(shape)))]
        return part["rest"] + int(shape["num_layers"]) * part["per_layer"]


def check_shapes(shapes: list[dict], count: int, seed: int = 0) -> list[dict]:
    """The shapes the part model is checked on: the largest, the smallest and seeded others."""
    ordered = sorted(shapes, key=count_parameters)
    picked = [ordered[-1], ordered[0]]
    rest = ordered[1:-1]
    random.Random(seed).shuffle(rest)
    picked += rest[:max(0, count - 2)]
    return picked[:max(1, count)]


def shape_name(shape: dict) -> str:
    return "h{}_f{}_a{}_l{}".format(*width_key(shape), int(shape["num_layers"]))


def latencies(shapes: list[dict], latency, layout, folder: Path, log=print, reference: dict | None = None) -> dict:
    """``{"ms": {shape name: ms}, "method": whole | parts, "check": [...], "max_error": e}`` for
    ``shapes``, timed here (see the module), or read from ``folder/latency.json`` when it holds
    the same shapes timed with the same settings on the same kind of device. With ``reference``
    (a shape), ``reference_ms`` is its time: the median of three whole timings, before the grid's."""
    device = torch.cuda.get_device_name(layout.device) if layout.device.type == "cuda" else "cpu"
    settings = {k: latency[k] for k in ("batch", "context", "decode_tokens", "repeats", "whole_limit",
                                       "check_shapes")}
    key = config_hash({"device": device, "dtype": str(layout.compute_dtype), "settings": settings,
                       "shapes": sorted(shape_name(s) for s in shapes),
                       "reference": shape_name(reference) if reference else None})
    saved = folder / "latency.json"
    if saved.exists():
        found = read_json(saved, "prune.candidates")
        if found.get("key") == key:
            log(f"[prune] latency: {len(shapes)} shapes, timed before ({saved})", flush=True)
            return found
    log(f"[prune] latency on {device}: decode at batch {latency.batch} after {latency.context} tokens, "
        f"{len(shapes)} shapes", flush=True)
    reference_ms = None
    if reference is not None:
        reference_ms = statistics.median(time_shape(reference, latency, layout) for _ in range(3))
        log(f"[prune] latency of the reference {shape_name(reference)}: {reference_ms:.3f} ms: the target", flush=True)
    if len(shapes) <= int(latency.whole_limit):
        timed = {}
        for number, shape in enumerate(shapes, 1):
            same = reference is not None and shape_name(shape) == shape_name(reference)
            # the reference's own shape keeps the reference's time: as fast as itself, not a coin flip of noise
            timed[shape_name(shape)] = reference_ms if same else time_shape(shape, latency, layout)
            log(f"[prune] latency {number}/{len(shapes)}: {shape_name(shape)} {timed[shape_name(shape)]:.3f} ms",
                flush=True)
        found = {"method": "whole", "ms": timed, "check": [], "max_error": 0.0}
    else:
        model = PartModel.timed(shapes, latency, layout, log)
        check = []
        for shape in check_shapes(shapes, int(latency.check_shapes)):
            whole, modelled = time_shape(shape, latency, layout), model(shape)
            check.append({"shape": shape_name(shape), "whole_ms": whole, "modelled_ms": modelled,
                          "error": abs(modelled - whole) / whole})
            log(f"[prune] latency check {shape_name(shape)}: whole {whole:.3f} ms, parts {modelled:.3f} ms "
                f"({100 * check[-1]['error']:.1f}%)", flush=True)
        ms = {shape_name(s): model(s) for s in shapes}
        if reference is not None and shape_name(reference) in ms:
            ms[shape_name(reference)] = reference_ms
        found = {"method": "parts", "ms": ms, "check": check,
                 "max_error": max(c["error"] for c in check), "parts": model.parts}
    found.update(key=key, device=device, settings=settings, reference_ms=reference_ms)
    write_json(saved, found)
    return found


def check_part_model(found: dict, max_error: float) -> None:
    """Refuse a part model whose error on whole-model timings is above ``prune.latency.max_error``."""
    if found["method"] != "parts":
        return
    worst = max(found["check"], key=lambda c: c["error"])
    require(found["max_error"] <= max_error,
            f"the latency part model is off by {100 * worst['error']:.1f}% on {worst['shape']} (whole "
            f"{worst['whole_ms']:.3f} ms, parts {worst['modelled_ms']:.3f} ms), above {100 * max_error:.0f}%; "
            "raise prune.latency.whole_limit to time every shape whole, or raise prune.latency.repeats / "
            "decode_tokens for steadier timings", "prune.latency.max_error")
