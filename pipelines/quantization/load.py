"""ModelOpt's unified Hugging Face checkpoint read back as a fake-quantized model.

Serving engines (vLLM, TensorRT-LLM, SGLang) read the quantized weights and scales that
:func:`modelopt.torch.export.export_hf_checkpoint` writes. This module reads the same files: each
quantized linear layer's weight is dequantized from its stored integers or FP8 values and scales
(what an engine's kernel multiplies by), and its input goes through ModelOpt's own
:class:`~modelopt.torch.quantization.nn.TensorQuantizer` at the stored input scale (and
``pre_quant_scale``, where AWQ or SmoothQuant left one). The result computes what the exported
checkpoint computes, in the dtype asked for: evaluation scores the shipped files, and the
quantize stage checks each export against the model it quantized.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pipelines.core.errors import UserError

FP8_MAX = 448.0   # largest float8_e4m3fn
INT8_MAX = 127.0


def is_scale(key: str) -> bool:
    """A scale the export stores beside a quantized weight (``weight_scale``, ``weight_scale_2``,
    ``input_scale``, ``pre_quant_scale``, ...): float32, and not a parameter of the model."""
    last = key.rsplit(".", 1)[-1]
    return last.endswith("scale") or last.endswith("scale_2")


def quant_config(folder: Path) -> dict:
    """The ``quantization`` section of ``hf_quant_config.json`` (``quant_algo``, ``group_size``, ...)."""
    path = folder / "hf_quant_config.json"
    if not path.exists():
        raise UserError(f"{folder} has no hf_quant_config.json: not a ModelOpt quantized export", "eval.checkpoint")
    return json.loads(path.read_text())["quantization"]


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Signed int4 values ``[out, in]`` from ModelOpt's packing: two output rows per byte, low nibble first."""
    low = (packed & 0x0F).to(torch.int8)
    high = ((packed >> 4) & 0x0F).to(torch.int8)
    low = torch.where(low > 7, low - 16, low)
    high = torch.where(high > 7, high - 16, high)
    # packed[r, c] holds rows 2r (low) and 2r+1 (high) of column c
    return torch.stack((low, high), dim=1).reshape(packed.shape[0] * 2, packed.shape[1])


def dequantize(algo: str, tensors: dict[str, torch.Tensor], prefix: str, group: int | None = None) -> torch.Tensor:
    """The float32 weight of linear layer ``prefix`` from its stored weight and scales."""
    weight = tensors[f"{prefix}.weight"]
    scale = tensors[f"{prefix}.weight_scale"].float()
    if algo == "FP8":
        return weight.float() * scale
    if algo.startswith("W8A8_SQ"):
        return weight.float() * scale.reshape(-1, 1)
    if algo in ("W4A16_AWQ", "W4A8_AWQ"):
        values = unpack_int4(weight).float()
        block = group or values.shape[1] // scale.shape[1]
        weight = values * scale[:, torch.arange(values.shape[1]) // block]
        if algo == "W4A8_AWQ":   # the int4 blocks are then FP8 at the per-tensor weight_scale_2
            second = tensors[f"{prefix}.weight_scale_2"].float()
            weight = (weight / second).to(torch.float8_e4m3fn).float() * second
        return weight
    raise UserError(f"quant_algo {algo} has no reader here (FP8, W8A8_SQ_PER_CHANNEL, W4A16_AWQ, W4A8_AWQ)",
                    "quantize.formats")


def input_bits(algo: str):
    """The activation format of ``algo`` as ModelOpt ``num_bits`` (None: activations stay unquantized)."""
    return {"FP8": (4, 3), "W4A8_AWQ": (4, 3)}.get(algo, 8 if algo.startswith("W8A8_SQ") else None)


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(path))
    if not tensors:
        raise UserError(f"{folder} holds no *.safetensors", "eval.checkpoint")
    return tensors


class QuantizedInput(torch.nn.Module):
    """What a serving kernel does to a linear layer's input: scale by ``pre_quant_scale``, then
    quantize at the stored input scale (ModelOpt's fake quantization)."""

    def __init__(self, pre_quant_scale: torch.Tensor | None, bits, input_scale: torch.Tensor | None):
        super().__init__()
        from modelopt.torch.quantization.config import QuantizerAttributeConfig
        from modelopt.torch.quantization.nn import TensorQuantizer

        self.register_buffer("pre_quant_scale", pre_quant_scale)
        self.quantizer = None
        if bits is not None and input_scale is not None:
            self.quantizer = TensorQuantizer(QuantizerAttributeConfig(num_bits=bits, axis=None))
            maxbound = FP8_MAX if bits == (4, 3) else INT8_MAX
            self.quantizer.amax = input_scale.float().reshape(()) * maxbound

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre_quant_scale is not None:
            x = x * self.pre_quant_scale.to(x.dtype)
        return self.quantizer(x) if self.quantizer is not None else x


def load_fake_quantized(folder: Path, dtype: torch.dtype = torch.float32, layout=None):
    """``(LlamaForCausalLM, quant_algo)`` computing what the exported checkpoint ``folder`` computes,
    on ``layout``'s device (on the host without one)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    settings = quant_config(folder)
    algo, group = settings["quant_algo"], settings.get("group_size")
    config = json.loads((folder / "config.json").read_text())
    config.pop("quantization_config", None)
    config["torch_dtype"] = config["dtype"] = str(dtype).replace("torch.", "")
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**config))
    tensors = read_tensors(folder)
    state = {}
    hooks = {}
    for key in list(tensors):
        if not key.endswith(".weight_scale"):
            continue
        prefix = key[: -len(".weight_scale")]
        state[f"{prefix}.weight"] = dequantize(algo, tensors, prefix, group)
        pre = tensors.get(f"{prefix}.pre_quant_scale")
        hooks[prefix] = QuantizedInput(pre.float() if pre is not None else None, input_bits(algo),
                                       tensors.get(f"{prefix}.input_scale"))
    for key, value in tensors.items():
        if is_scale(key):
            continue
        state.setdefault(key, value)
    if bool(config.get("tie_word_embeddings")) and "lm_head.weight" not in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False, assign=True)
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise UserError(f"{folder}: the export lacks {missing[:3]}", "eval.checkpoint")
    model.model.rotary_emb = type(model.model.rotary_emb)(model.config)   # its buffer was on meta
    if bool(config.get("tie_word_embeddings")):
        model.tie_weights()
    for prefix, quantize_input in hooks.items():
        linear = model.get_submodule(prefix)
        linear.add_module("quantized_input", quantize_input)
        linear.register_forward_pre_hook(lambda module, args: (module.quantized_input(args[0]), *args[1:]))
    return (layout.place_module(model) if layout is not None else model).eval(), algo
