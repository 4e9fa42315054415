"""Core attention through ``torch.nn.functional.scaled_dot_product_attention`` for megatron's
local layer spec (CPU, and GPU images without transformer-engine).

megatron's local ``DotProductAttention`` materialises the ``[b, H/tp, s, s]`` scores, a float32
softmax of them and a 16-bit copy, all kept for the backward pass: at sequence 8192 that is most
of a GPU's memory (``make gpu-check`` measured it on an H200), and on CPU it is slower than
torch's flash kernel. :class:`SDPAttention` keeps everything else of megatron's module (its
checks, partition sizes, state dict) and replaces the forward pass with torch's fused kernel
(flash or memory-efficient on a GPU, flash on CPU), which keeps only its inputs, output and the
per-row log-sum-exp. The plain causal mask (:func:`pipelines.ops.masks.causal_mask`) is applied
by the kernel (``is_causal``); any other mask given, such as the per-document one of packed
conversations (:func:`pipelines.ops.masks.document_inputs`), is passed to the kernel as it is.
Anything the kernel path does not cover (another mask type, attention dropout, softmax offsets,
windows, packed-sequence parameters, query-key layer scaling) goes through megatron's own forward.

Grouped-query attention: the kernel is given the query groups' keys and values as they are
(``enable_gqa``) only where the kernel that would run takes them. torch's CPU flash kernel does,
and faster than with the keys repeated. On a GPU the flash kernel does (cuDNN's
too, on an H200, but torch's default order tries it after the math kernel except on Hopper and
Blackwell with a recent cuDNN, so it is not counted on): where it cannot run (float32, a head
dimension over 256, a GPU before Ampere, or flash turned off) torch would fall back, silently, to
its math kernel, which builds the ``[b, H, s, s]`` scores this module is here to avoid. There the
keys and values are repeated per query head first (``H/G`` times the small key and value tensors),
and the memory-efficient kernel runs.
"""

from __future__ import annotations

import torch.nn.functional as F
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType

from pipelines.ops.masks import is_plain_causal


def kernel_takes_groups(query, key, value, allowed=None) -> bool:
    """Whether the kernel torch picks for these ``[b, heads, s, d]`` inputs (causal, or under the
    boolean mask ``allowed``) takes keys and values with fewer heads than the query (``enable_gqa``)
    without falling back to its math kernel."""
    if query.device.type != "cuda":
        return True   # the CPU flash kernel runs for any dtype, head dimension and mask
    from torch.backends.cuda import SDPAParams, can_use_flash_attention, flash_sdp_enabled

    return flash_sdp_enabled() and can_use_flash_attention(
        SDPAParams(query, key, value, allowed, 0.0, allowed is None, True))


class SDPAttention(DotProductAttention):
    """megatron's ``DotProductAttention`` whose causal forward pass is torch's fused SDPA kernel."""

    def _fused(self, attn_mask_type, attention_bias, packed_seq_params) -> bool:
        config = self.config
        return ((attn_mask_type or self.attn_mask_type) == AttnMaskType.causal
                and attention_bias is None and packed_seq_params is None and self.softmax_offset is None
                and not config.apply_query_key_layer_scaling and config.window_size is None
                and (self.attention_dropout.p == 0.0 or not self.training))

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if not self._fused(attn_mask_type, attention_bias, packed_seq_params):
            return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias,
                                   packed_seq_params)
        # [s, b, heads, d] -> [b, heads, s, d]; key and value have the query groups' heads
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))
        # the plain causal mask is the kernel's own; another (per document: [b, 1, s, s]) is given
        allowed = None if attention_mask is None or is_plain_causal(attention_mask) else ~attention_mask
        heads, groups = self.num_attention_heads_per_partition, self.num_query_groups_per_partition
        grouped = heads != groups
        if grouped and not kernel_takes_groups(q, k, v, allowed):
            # query head i is in group i // (heads / groups), as megatron lays them out
            k, v = (x.repeat_interleave(heads // groups, dim=1) for x in (k, v))
            grouped = False
        context = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, is_causal=allowed is None,
                                                 scale=self.softmax_scale, enable_gqa=grouped)
        # [b, heads, s, d] -> [s, b, heads * d]
        b, heads, s, d = context.shape
        return context.permute(2, 0, 1, 3).reshape(s, b, heads * d)
