"""Hugging Face Llama <-> megatron-core: config and weight mapping, one tensor at a time.

Names are megatron's *local* layer spec, which import and export build in host memory on any
node; its sharded state dict stores the norms under the transformer-engine spec's names, so the
checkpoint loads into either spec (:mod:`pipelines.model.checkpoint`).
QKV is megatron's per-group layout: for each query group, its query heads, then its key head,
then its value head. :func:`placements` is the one table of where each row block goes. The MLP's ``linear_fc1`` is ``[gate; up]``. Embedding and output rows are
padded with zeros to the padded vocabulary, and the padding is dropped again on export.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch

from pipelines.core.artifacts import read_json
from pipelines.core.errors import UserError, require
from pipelines.model.build import padded_vocab_size

SUPPORTED_MODEL_TYPES = ("llama",)
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "generation_config.json", "chat_template.jinja",   # transformers 5 keeps an instruct model's template apart
)


def read_config(folder: Path, make_vocab_size_divisible_by: int = 128, key: str = "import.source") -> dict:
    """The megatron architecture of a Hugging Face Llama folder, validated (``key`` named it)."""
    require(folder.is_dir(), f"{folder} is not a folder", key)
    config_path = folder / "config.json"
    require(config_path.exists(), f"{folder} has no config.json (not a Hugging Face model folder)",
            key)
    hf = read_json(config_path, key)
    require(isinstance(hf, dict), f"{config_path} holds no JSON object", key)
    missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                           "vocab_size") if k not in hf]
    require(not missing, f"{config_path} has no {', '.join(missing)} (a truncated or foreign config)", key)
    model_type = hf.get("model_type")
    require(model_type in SUPPORTED_MODEL_TYPES, f"{config_path}: model_type {model_type!r} is not "
            f"supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})", key)
    require(hf.get("hidden_act", "silu") == "silu", f"{config_path}: hidden_act "
            f"{hf.get('hidden_act')!r} is not supported (only silu)", key)
    require(not hf.get("attention_bias", False) and not hf.get("mlp_bias", False),
            f"{config_path}: biases in attention or MLP are not supported", key)
    heads = hf["num_attention_heads"]
    scaling = hf.get("rope_scaling")
    rope_theta = hf.get("rope_theta")
    if scaling is None and isinstance(hf.get("rope_parameters"), dict):  # transformers >= 5 layout
        scaling = dict(hf["rope_parameters"])
        rope_theta = scaling.pop("rope_theta", rope_theta)
    rope_scaling = None
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind == "llama3":
            rope_scaling = {
                "type": "llama3",
                "factor": float(scaling["factor"]),
                "low_freq_factor": float(scaling["low_freq_factor"]),
                "high_freq_factor": float(scaling["high_freq_factor"]),
                "original_max_position_embeddings": int(scaling["original_max_position_embeddings"]),
            }
        elif kind not in (None, "default"):
            raise UserError(f"{config_path}: rope_scaling type {kind!r} is not supported "
                            "(supported: llama3, default)", key)
    return {
        "num_layers": hf["num_hidden_layers"],
        "hidden_size": hf["hidden_size"],
        "ffn_hidden_size": hf["intermediate_size"],
        "num_attention_heads": heads,
        "num_query_groups": hf.get("num_key_value_heads") or heads,
        "kv_channels": hf.get("head_dim") or hf["hidden_size"] // heads,
        "vocab_size": hf["vocab_size"],
        "max_position_embeddings": hf.get("max_position_embeddings", 4096),
        "rotary_base": float(rope_theta if rope_theta is not None else 10000.0),
        "rope_scaling": rope_scaling,
        "norm_eps": float(hf.get("rms_norm_eps", 1e-5)),
        "tie_word_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "make_vocab_size_divisible_by": make_vocab_size_divisible_by,
    }


def hf_config(arch: Mapping[str, Any], dtype: torch.dtype, bos_token_id=None, eos_token_id=None) -> dict:
    """A ``config.json`` for ``LlamaForCausalLM`` with this architecture (any shape, pruned too)."""
    from transformers import LlamaConfig

    scaling = arch["rope_scaling"]
    rope = None
    if scaling is not None:
        rope = {key: value for key, value in scaling.items() if key != "type"}
        rope["rope_type"] = "llama3"
    config = LlamaConfig(
        vocab_size=arch["vocab_size"],
        hidden_size=arch["hidden_size"],
        intermediate_size=arch["ffn_hidden_size"],
        num_hidden_layers=arch["num_layers"],
        num_attention_heads=arch["num_attention_heads"],
        num_key_value_heads=arch["num_query_groups"],
        head_dim=arch["kv_channels"],
        max_position_embeddings=arch["max_position_embeddings"],
        rms_norm_eps=arch["norm_eps"],
        rope_theta=arch["rotary_base"],
        rope_scaling=rope,
        tie_word_embeddings=arch["tie_word_embeddings"],
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        torch_dtype=str(dtype).removeprefix("torch."),
    )
    config.architectures = ["LlamaForCausalLM"]
    return config.to_dict()


def placements(arch: Mapping[str, Any]) -> Iterator[tuple[str, int, str, int, int]]:
    """Where every Hugging Face row block goes in megatron's tensors.

    Yields ``(megatron name, megatron first row, hf name, hf first row, rows)``. Rows of a
    megatron tensor not covered (vocabulary padding) are zero. Import reads each block straight
    into the model's memory with no intermediate copy; export (:func:`to_hf`) reads the same
    table backwards, so both directions share one mapping.
    """
    heads, groups, head_dim = arch["num_attention_heads"], arch["num_query_groups"], arch["kv_channels"]
    per_group, ffn, hidden = heads // groups, arch["ffn_hidden_size"], arch["hidden_size"]
    yield "embedding.word_embeddings.weight", 0, "model.embed_tokens.weight", 0, arch["vocab_size"]
    for layer in range(arch["num_layers"]):
        hf, mc = f"model.layers.{layer}.", f"decoder.layers.{layer}."
        yield mc + "input_layernorm.weight", 0, hf + "input_layernorm.weight", 0, hidden
        qkv = mc + "self_attention.linear_qkv.weight"
        for group in range(groups):
            row = group * (per_group + 2) * head_dim
            yield qkv, row, hf + "self_attn.q_proj.weight", group * per_group * head_dim, per_group * head_dim
            yield qkv, row + per_group * head_dim, hf + "self_attn.k_proj.weight", group * head_dim, head_dim
            yield qkv, row + (per_group + 1) * head_dim, hf + "self_attn.v_proj.weight", group * head_dim, head_dim
        yield mc + "self_attention.linear_proj.weight", 0, hf + "self_attn.o_proj.weight", 0, hidden
        yield mc + "pre_mlp_layernorm.weight", 0, hf + "post_attention_layernorm.weight", 0, hidden
        yield mc + "mlp.linear_fc1.weight", 0, hf + "mlp.gate_proj.weight", 0, ffn
        yield mc + "mlp.linear_fc1.weight", ffn, hf + "mlp.up_proj.weight", 0, ffn
        yield mc + "mlp.linear_fc2.weight", 0, hf + "mlp.down_proj.weight", 0, hidden
    yield "decoder.final_layernorm.weight", 0, "model.norm.weight", 0, hidden
    if not arch["tie_word_embeddings"]:
        yield "output_layer.weight", 0, "lm_head.weight", 0, arch["vocab_size"]


def megatron_shapes(arch: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Shapes of the megatron local-spec tensors (single process, padded vocabulary)."""
    heads, groups, head_dim = arch["num_attention_heads"], arch["num_query_groups"], arch["kv_channels"]
    hidden, ffn, vocab = arch["hidden_size"], arch["ffn_hidden_size"], padded_vocab_size(arch)
    shapes = {"embedding.word_embeddings.weight": (vocab, hidden),
              "decoder.final_layernorm.weight": (hidden,)}
    for layer in range(arch["num_layers"]):
        mc = f"decoder.layers.{layer}."
        shapes.update({
            mc + "input_layernorm.weight": (hidden,),
            mc + "self_attention.linear_qkv.weight": ((heads + 2 * groups) * head_dim, hidden),
            mc + "self_attention.linear_proj.weight": (hidden, heads * head_dim),
            mc + "pre_mlp_layernorm.weight": (hidden,),
            mc + "mlp.linear_fc1.weight": (2 * ffn, hidden),
            mc + "mlp.linear_fc2.weight": (hidden, ffn),
        })
    if not arch["tie_word_embeddings"]:
        shapes["output_layer.weight"] = (vocab, hidden)
    return shapes


def to_hf(get: Callable[[str], torch.Tensor], arch: Mapping[str, Any]
          ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(Hugging Face name, tensor)`` from a megatron local-spec tensor getter."""
    blocks: dict[str, list[tuple[str, int, int, int]]] = {}
    for name, row, hf_name, hf_row, rows in placements(arch):
        blocks.setdefault(hf_name, []).append((name, row, hf_row, rows))
    for hf_name, parts in blocks.items():
        if len(parts) == 1:
            name, row, _, rows = parts[0]
            yield hf_name, get(name)[row:row + rows]
            continue
        first = get(parts[0][0])
        tensor = first.new_empty((sum(rows for *_, rows in parts), *first.shape[1:]))
        for name, row, hf_row, rows in parts:
            tensor[hf_row:hf_row + rows] = get(name)[row:row + rows]
        yield hf_name, tensor


def expected_hf_names(arch: Mapping[str, Any]) -> set[str]:
    """Every tensor name a Hugging Face folder of this architecture must hold."""
    return {hf_name for _, _, hf_name, _, _ in placements(arch)}
