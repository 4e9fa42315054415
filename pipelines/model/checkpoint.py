"""Engine checkpoints: a megatron ``dist_checkpointing`` folder plus the architecture.

Layout of a checkpoint folder::

    model.yaml      the architecture (the ``model`` config keys) and the stored dtype
    weights/        megatron-core dist_checkpointing (loads at any TP/PP layout)
    tokenizer/      the Hugging Face tokenizer files, copied from the source
    manifest.json   written last: what made it, with hashes and parameter count

A checkpoint saved at one parallel layout loads at another: :func:`load_model` builds the model
for the current layout and lets ``dist_checkpointing`` reshard.

**One key set for every layer spec.** ``weights/`` holds exactly :func:`te_spec_keys`: the keys
transformer-engine's spec asks for, without TE's ``_extra_state`` (FP8 metadata, meaningless for
bf16 weights). The local spec (CPU, import, export) and the ModelOpt spec (width pruning) write
those same keys through their norm remapping (see :func:`pipelines.model.spec.layer_spec`), and
:func:`save_weights` / :func:`load_weights` leave ``_extra_state`` out in both directions, so a
checkpoint written on a laptop loads into the TE model on a GPU node and back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
import yaml

from pipelines.core.artifacts import read_manifest, sha256_file
from pipelines.core.errors import require
from pipelines.model import build as model_lib

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def read_architecture(folder: Path, key: str = "the checkpoint path") -> tuple[dict, torch.dtype]:
    """The architecture and stored dtype of a complete checkpoint folder (``key``: the config key
    that named it, for the error)."""
    folder = Path(folder)
    require(folder.is_dir(), f"checkpoint {folder} does not exist", key)
    require(read_manifest(folder) is not None and (folder / "model.yaml").exists(),
            f"{folder} is not a complete checkpoint (no manifest.json or model.yaml)", key)
    stored = yaml.safe_load((folder / "model.yaml").read_text())
    dtype = DTYPES[stored.pop("dtype")]
    return model_lib.architecture(stored), dtype


def write_architecture(folder: Path, arch: Mapping[str, Any], dtype: torch.dtype) -> None:
    (Path(folder) / "model.yaml").write_text(
        yaml.safe_dump({**dict(arch), "dtype": dtype_name(dtype)}, sort_keys=False))


def _own_views_releasing_parameters(model, state) -> None:
    """Replace tensor views in a sharded state dict by copies, freeing each parameter after.

    megatron stores SwiGLU's ``linear_fc1`` as two views (gate, up) and its writer clones every
    CPU view before writing, so a save briefly holds all of ``fc1`` twice. Copying the views of
    one parameter and then freeing that parameter keeps the peak at one ``fc1`` extra. The
    model is unusable afterwards: only for a final save (import).
    """
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    apply_factories(state)
    owners = {parameter.untyped_storage().data_ptr(): parameter for parameter in model.parameters()}
    views: dict[int, list] = {}
    for value in nested_values(state):
        if isinstance(value, ShardedTensor) and value.data is not None:
            storage = value.data.untyped_storage()
            if storage.size() != value.data.numel() * value.data.element_size():
                views.setdefault(storage.data_ptr(), []).append(value)
    for pointer, sharded in views.items():
        for value in sharded:
            value.data = value.data.clone()
        if pointer in owners:
            owners[pointer].data = owners[pointer].data.new_empty(0)


def te_spec_keys(arch: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """The weight keys (and global shapes) a TE-spec ``GPTModel`` of ``arch`` asks
    ``dist_checkpointing`` for.

    Where the list comes from (megatron-core 0.16.1): ``get_gpt_layer_with_transformer_engine_spec``
    in ``megatron/core/models/gpt/gpt_layer_specs.py`` builds each layer from
    ``TELayerNormColumnParallelLinear`` for ``self_attention.linear_qkv`` and ``mlp.linear_fc1``
    (TE's ``LayerNormLinear``: parameters ``weight`` and, for RMSNorm, ``layer_norm_weight``; no
    bias with ``add_bias_linear=False``), ``TERowParallelLinear`` for ``linear_proj`` and
    ``linear_fc2`` (``weight``), ``TEDotProductAttention`` (no parameters) and ``IdentityOp`` input
    and pre-MLP norms; ``TENorm`` is the final norm. ``TransformerBlock.sharded_state_dict`` stacks
    the layers' tensors under ``decoder.layers.<name>`` with the layer as the leading axis, and
    ``GPTModel`` adds the (padded) word embeddings and, untied, the output layer. TE's
    ``_extra_state`` entries are excluded on purpose (see the module doc).
    """
    layers, hidden, ffn = arch["num_layers"], arch["hidden_size"], arch["ffn_hidden_size"]
    head_dim, heads, groups = arch["kv_channels"], arch["num_attention_heads"], arch["num_query_groups"]
    vocab = model_lib.padded_vocab_size(arch)
    keys = {"embedding.word_embeddings.weight": (vocab, hidden), "decoder.final_layernorm.weight": (hidden,),
            "decoder.layers.self_attention.linear_qkv.layer_norm_weight": (layers, hidden),
            "decoder.layers.self_attention.linear_qkv.weight": (layers, (heads + 2 * groups) * head_dim, hidden),
            "decoder.layers.self_attention.linear_proj.weight": (layers, hidden, heads * head_dim),
            "decoder.layers.mlp.linear_fc1.layer_norm_weight": (layers, hidden),
            "decoder.layers.mlp.linear_fc1.weight": (layers, 2 * ffn, hidden),
            "decoder.layers.mlp.linear_fc2.weight": (layers, hidden, ffn)}
    if not arch["tie_word_embeddings"]:
        keys["output_layer.weight"] = (vocab, hidden)
    return keys


def content_digest(folder: Path) -> str:
    """A hash of a checkpoint's content: its weight files (megatron writes the same bytes for the
    same tensors and layout; ``.metadata`` holds a random id and is left out) and ``model.yaml``.
    Two imports of one Hugging Face folder get the same digest, wherever they are."""
    import hashlib

    folder = Path(folder)
    digest = hashlib.sha256((folder / "model.yaml").read_bytes())
    for path in sorted((folder / "weights").rglob("*")):
        if path.is_file() and path.name != ".metadata":
            digest.update(f"{path.relative_to(folder)}:{sha256_file(path)}".encode())
    return digest.hexdigest()


def content_id(folder: Path) -> str:
    """The checkpoint's content digest: recorded in its manifest when written, else computed."""
    return (read_manifest(folder) or {}).get("content") or content_digest(folder)


def saved_keys(folder: Path) -> dict[str, tuple[int, ...]]:
    """The tensor keys stored in ``folder/weights`` and their global shapes."""
    from megatron.core import dist_checkpointing

    metadata = dist_checkpointing.load_tensors_metadata(str(Path(folder) / "weights"))
    return {key: tuple(value.global_shape) for key, value in metadata.items()}


def _without_extra_state(state: dict) -> dict:
    """A model's sharded state dict minus TE's ``_extra_state`` entries (never saved, never asked)."""
    return {key: value for key, value in state.items() if not key.endswith("_extra_state")}


def save_weights(model, folder: Path, release_model: bool = False, writer_processes: int = 1) -> None:
    """Save this rank's share of ``model`` into ``folder/weights`` (all ranks call this).

    ``release_model`` frees the model's memory while saving (see
    :func:`_own_views_releasing_parameters`). ``writer_processes`` is megatron's
    ``thread_count``: forked writer processes per rank.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    weights = Path(folder) / "weights"
    weights.mkdir(parents=True, exist_ok=True)
    state = _without_extra_state(model.sharded_state_dict(prefix=""))
    if release_model:
        _own_views_releasing_parameters(model, state)
    strategy = TorchDistSaveShardedStrategy("torch_dist", 1, thread_count=writer_processes)
    dist_checkpointing.save(state, str(weights), strategy)


def load_weights(model, folder: Path) -> None:
    """Load ``folder/weights`` into ``model``, resharding to the current layout."""
    from megatron.core import dist_checkpointing

    state = dist_checkpointing.load(_without_extra_state(model.sharded_state_dict(prefix="")),
                                    str(Path(folder) / "weights"))
    result = model.load_state_dict(state, strict=False)
    missing = [key for key in result.missing_keys if not key.endswith("_extra_state")]
    require(not missing and not result.unexpected_keys,
            f"checkpoint {folder} does not fit the model: missing {missing[:4]}, unexpected "
            f"{result.unexpected_keys[:4]}", "the checkpoint path")


def load_model(folder: Path, layout, dtype: torch.dtype | None = None, host: bool = False,
               purpose: str = "train", **config_overrides):
    """Build the checkpoint's model for the current parallel layout and load its weights.

    Returns ``(model, arch)``, the model on ``layout.device``; with ``host``, in host memory with
    the host layer spec. ``dtype`` (the checkpoint's if None) is the dtype the model is built in,
    so every module sees it from construction (megatron's attention softmax decides its float32
    upcast then); loading casts the stored tensors. ``purpose`` picks the layer spec otherwise
    (:func:`pipelines.model.spec.layer_spec`).
    """
    arch, stored_dtype = read_architecture(folder)
    model_lib.validate(arch, layout.tensor_parallel, layout.pipeline_parallel)
    config = model_lib.transformer_config(arch, dtype or stored_dtype, layout.tensor_parallel,
                                          layout.pipeline_parallel, layout.context_parallel,
                                          device="cpu" if host else layout.device, **config_overrides)
    model = model_lib.build(arch, config, initialize=False, purpose="host" if host else purpose)
    load_weights(model, folder)
    return model.to(torch.device("cpu") if host else layout.device), arch
