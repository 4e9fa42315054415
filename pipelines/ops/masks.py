"""A batch's attention mask and positions: plain causal, or causal within each document.

Masks are megatron's: ``True`` where a position may NOT attend. The plain causal mask is one
tensor per sequence length and device (:func:`causal_mask`), so attention can tell it from any
other mask by its storage (:func:`is_plain_causal`) without reading it: the fused kernel then
applies causality itself. A detached or recomputed copy shares that storage.

**Documents** (``data.chat.packing=isolated``): a sample packing several whole conversations
gives each its own positions, from 0, and lets each attend only to itself
(:func:`document_inputs`), so every conversation sees what it would see alone in a sample.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

_CAUSAL: OrderedDict = OrderedDict()
_KEPT = 8   # lengths kept: scoring batches vary in length, and each mask is s^2 bytes


def causal_mask(sequence_length: int, device=None) -> torch.Tensor:
    """megatron's causal mask ``[1, 1, s, s]``: True where a position may NOT attend (above the diagonal)."""
    device = torch.device(device if device is not None else "cpu")
    key = (int(sequence_length), str(device))
    mask = _CAUSAL.get(key)
    if mask is None:
        mask = torch.triu(torch.ones(1, 1, sequence_length, sequence_length, dtype=torch.bool, device=device),
                          diagonal=1)
        _CAUSAL[key] = mask
        while len(_CAUSAL) > _KEPT:
            _CAUSAL.popitem(last=False)
    _CAUSAL.move_to_end(key)
    return mask


def is_plain_causal(mask) -> bool:
    """Whether ``mask`` is :func:`causal_mask`'s (or a view of its storage); False for any other mask."""
    if mask is None:
        return False
    kept = _CAUSAL.get((int(mask.shape[-1]), str(mask.device)))
    return kept is not None and mask.untyped_storage().data_ptr() == kept.untyped_storage().data_ptr()


def document_inputs(starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions ``[b, s]`` restarting at 0 at each document, and the mask ``[b, 1, s, s]`` that
    keeps attention causal and within each document, of a ``[b, s]`` batch whose ``starts`` is
    True where a document begins (its first position always begins one)."""
    starts = starts.to(torch.bool).clone()
    starts[:, 0] = True
    s = starts.shape[1]
    index = torch.arange(s, device=starts.device).expand_as(starts)
    first = torch.cummax(torch.where(starts, index, 0), dim=1).values   # where each position's document began
    document = torch.cumsum(starts, dim=1)
    other = (document[:, :, None] != document[:, None, :])[:, None]
    return index - first, other | causal_mask(s, starts.device)


def hf_inputs(tokens: torch.Tensor, position_ids=None, attention_mask=None, dtype=torch.float32) -> dict:
    """A Hugging Face causal LM's keyword inputs for what a megatron model reads: the tokens alone
    under the plain causal mask; under another (per document), its positions and the mask as the
    additive 4D one transformers takes as it is, in the model's ``dtype`` (0 where a position may
    attend, the dtype's lowest value where not: eager and SDPA attention alike)."""
    if attention_mask is None or is_plain_causal(attention_mask):
        return {"input_ids": tokens}
    additive = torch.zeros(attention_mask.shape, dtype=dtype, device=attention_mask.device)
    return {"input_ids": tokens, "position_ids": position_ids,
            "attention_mask": additive.masked_fill(attention_mask, torch.finfo(dtype).min)}


def hf_batch(tokens: torch.Tensor, starts: torch.Tensor | None = None, dtype=torch.float32) -> dict:
    """:func:`hf_inputs` of a ``[b, s]`` batch whose packed conversations begin at ``starts`` (None: plain causal)."""
    if starts is None:
        return {"input_ids": tokens}
    return hf_inputs(tokens, *document_inputs(starts.to(tokens.device)), dtype)
