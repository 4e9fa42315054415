"""Core attention through ``torch.nn.functional.scaled_dot_product_attention`` for megatron's
local layer spec (CPU, and GPU images without transformer-engine).

megatron's local ``DotProductAttention`` materialises the ``[b, H/tp, s, s]`` scores, a float32
softmax of them and a 16-bit copy, all kept for the backward pass: at sequence 8192 that is most
of a GPU's memory (``make gpu-check`` measured it on an H200), and on CPU it is slower than
torch's flash kernel. :class:`SDPAttention` keeps everything else of megatron's module (its
checks, partition sizes, state dict) and replaces the forward pass with torch's fused kernel
(flash or memory-efficient on a GPU, flash on CPU), which keeps only its inputs, output and the
per-row log-sum-exp. The mask is the layer spec's causal one, applied by the kernel
(``is_causal``): the model's only mask is :func:`pipelines.model.causal_mask`. Anything the
kernel path does not cover (another mask type, attention dropout, softmax offsets, windows,
packed sequences, query-key layer scaling) goes through megatron's own forward.
"""

from __future__ import annotations

import torch.nn.functional as F
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType


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
        grouped = self.num_attention_heads_per_partition != self.num_query_groups_per_partition
        context = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale,
                                                 enable_gqa=grouped)
        # [b, heads, s, d] -> [s, b, heads * d]
        b, heads, s, d = context.shape
        return context.permute(2, 0, 1, 3).reshape(s, b, heads * d)
