"""Rotary position embedding in a few passes, for megatron's layer specs without transformer-engine.

megatron-core applies RoPE to the query and the key of every layer. With TE it calls TE's fused
kernel (``apply_rope_fusion``); without TE (CPU, and GPU images without it) its unfused code
recomputes ``cos`` and ``sin`` of the angles in every call, builds the rotated half with a negation
and a ``cat``, multiplies and adds the two products as new tensors, and copies the result once
more through a ``cat`` with an empty tail: about eight passes over q and k each way, and a dozen
small kernels more per layer. :func:`install` hands megatron, where TE's kernel is absent, a
function with TE's contract (``t [s, b, heads, d]``, angles ``freqs [s, 1, 1, d]``) that writes
each half of the result with one product and one fused multiply-add, in the forward and the
backward pass, from ``cos`` and ``sin`` computed once per angle tensor (megatron's rotary module
returns the same tensor for a sequence length, step after step). Same formula, so the same values
up to the rounding of a fused multiply-add. Anything else (interleaved or partial rotary
dimensions) goes through megatron's own code; packed sequences (``thd``) are not covered.
"""

from __future__ import annotations

import torch

_ANGLES: list[tuple] = []   # (freqs, dtype, halves): the few angle tensors in use, newest last


def install() -> bool:
    """Give megatron this RoPE where TE's fused one is absent (before a model config is built, which
    checks it is there); returns whether a fused RoPE is in place, i.e. whether to set
    ``apply_rope_fusion``: this one, or TE's kernel where TE is installed (Megatron-LM's default,
    ``--no-rope-fusion`` off; only a GPU with TE runs it)."""
    from megatron.core.models.common.embeddings import rope_utils

    if rope_utils.fused_apply_rotary_pos_emb is None:
        rope_utils.fused_apply_rotary_pos_emb = apply_rotary_pos_emb
    return rope_utils.fused_apply_rotary_pos_emb is not None


def _halves(freqs: torch.Tensor, dtype: torch.dtype):
    """``(cos₁, cos₂, sin₁, sin₂)``: cos and sin of the two halves of the angles' last dimension, in
    ``dtype``, computed and sliced once per angle tensor (not in every call, forward and backward)."""
    for angles, kind, halves in _ANGLES:
        if angles is freqs and kind == dtype:
            return halves
    half = freqs.shape[-1] // 2
    with torch.no_grad():
        cos, sin = torch.cos(freqs).to(dtype), torch.sin(freqs).to(dtype)
        halves = (cos[..., :half].contiguous(), cos[..., half:].contiguous(),
                  sin[..., :half].contiguous(), sin[..., half:].contiguous())
    _ANGLES.append((freqs, dtype, halves))
    del _ANGLES[:-4]
    return halves


def _combine(x: torch.Tensor, c_a, s_b, c_b, s_a, sign_first: float) -> torch.Tensor:
    """``[a·c_a + sign_first·b·s_b, b·c_b − sign_first·a·s_a]`` for ``x = [a, b]`` along the last
    dimension (a new contiguous tensor), each half written once in place."""
    half = c_a.shape[-1]
    a, b = x[..., :half], x[..., half:]
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    first, second = out[..., :half], out[..., half:]
    torch.mul(a, c_a, out=first).addcmul_(b, s_b, value=sign_first)
    torch.mul(b, c_b, out=second).addcmul_(a, s_a, value=-sign_first)
    return out


class _Rotate(torch.autograd.Function):
    """``t·cos + rotate_half(t)·sin`` with ``rotate_half(t) = [−t₂, t₁]``: the first half
    ``t₁·cos₁ − t₂·sin₁``, the second ``t₂·cos₂ + t₁·sin₂``; the gradient is the transposed map,
    ``[g₁·cos₁ + g₂·sin₂, g₂·cos₂ − g₁·sin₁]``. The cos and sin halves are constants of the cache
    (no gradient), held on ``ctx`` as they are."""

    @staticmethod
    def forward(ctx, t, halves):
        c1, c2, s1, s2 = ctx.halves = halves
        return _combine(t, c1, s1, c2, s2, -1.0)

    @staticmethod
    def backward(ctx, grad):
        c1, c2, s1, s2 = ctx.halves
        return _combine(grad, c1, s2, c2, s1, 1.0), None


def apply_rotary_pos_emb(t: torch.Tensor, freqs: torch.Tensor, interleaved: bool = False, **kwargs):
    """TE's ``fused_apply_rotary_pos_emb`` contract for the ``sbhd`` layout megatron uses."""
    if (interleaved or freqs.shape[-1] != t.shape[-1] or t.shape[-1] % 2
            or kwargs.get("tensor_format", "sbhd") != "sbhd"):
        from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

        return _apply_rotary_pos_emb_bshd(t, freqs, rotary_interleaved=interleaved)
    return _Rotate.apply(t, _halves(freqs, t.dtype))
