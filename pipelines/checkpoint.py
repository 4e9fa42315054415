"""Engine checkpoints: a megatron ``dist_checkpointing`` folder plus the architecture.

Layout of a checkpoint folder::

    model.yaml      the architecture (the ``model`` config keys) and the stored dtype
    weights/        megatron-core dist_checkpointing (loads at any TP/PP layout)
    tokenizer/      the Hugging Face tokenizer files, copied from the source
    manifest.json   written last: what made it, with hashes and parameter count

A checkpoint saved at one parallel layout loads at another: :func:`load_model` builds the model
for the current layout and lets ``dist_checkpointing`` reshard.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
import yaml

from pipelines import model as model_lib
from pipelines.artifacts import read_manifest
from pipelines.errors import require

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def read_architecture(folder: Path) -> tuple[dict, torch.dtype]:
    """The architecture and stored dtype of a complete checkpoint folder."""
    folder = Path(folder)
    require(folder.is_dir(), f"checkpoint {folder} does not exist", "the checkpoint path")
    require(read_manifest(folder) is not None and (folder / "model.yaml").exists(),
            f"{folder} is not a complete checkpoint (no manifest.json or model.yaml)",
            "the checkpoint path")
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
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories
    from megatron.core.dist_checkpointing.dict_utils import nested_values

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
    state = model.sharded_state_dict(prefix="")
    if release_model:
        _own_views_releasing_parameters(model, state)
    strategy = TorchDistSaveShardedStrategy("torch_dist", 1, thread_count=writer_processes)
    dist_checkpointing.save(state, str(weights), strategy)


def load_weights(model, folder: Path) -> None:
    """Load ``folder/weights`` into ``model``, resharding to the current layout."""
    from megatron.core import dist_checkpointing

    state = dist_checkpointing.load(model.sharded_state_dict(prefix=""), str(Path(folder) / "weights"))
    result = model.load_state_dict(state, strict=False)
    missing = [key for key in result.missing_keys if not key.endswith("_extra_state")]
    require(not missing and not result.unexpected_keys,
            f"checkpoint {folder} does not fit the model: missing {missing[:4]}, unexpected "
            f"{result.unexpected_keys[:4]}", "the checkpoint path")


def load_model(folder: Path, layout, dtype: torch.dtype | None = None, **config_overrides):
    """Build the checkpoint's model for the current parallel layout and load its weights.

    Returns ``(model, arch)``. ``dtype`` casts after loading (the checkpoint's dtype if None).
    """
    arch, stored_dtype = read_architecture(folder)
    model_lib.validate(arch, layout.tensor_parallel, layout.pipeline_parallel)
    config = model_lib.transformer_config(arch, stored_dtype, layout.tensor_parallel,
                                          layout.pipeline_parallel, layout.context_parallel,
                                          **config_overrides)
    model = model_lib.build(arch, config, initialize=False)
    load_weights(model, folder)
    target = dtype or stored_dtype
    if target != stored_dtype:
        model.to(target)
        model.config.params_dtype = target
        model.config.pipeline_dtype = target
        model.config.bf16 = target == torch.bfloat16
    return model.to(layout.device), arch
