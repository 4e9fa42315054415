"""What autograd keeps for a model's backward pass, counted as its memory would be."""

from __future__ import annotations

import torch

from pipelines.model import build as model_lib


def logits_and_kept_bytes(model, tokens: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The model's logits on ``tokens`` and the bytes autograd keeps for their backward pass:
    each storage once (views of one tensor share it), the model's weights left out."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        logits = model_lib.local_logits(model, tokens)
    return logits, sum(kept.values())
