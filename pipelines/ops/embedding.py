"""The input embedding adds its gradient straight into the DDP buffer (gradient-accumulation fusion).

megatron's ``VocabParallelEmbedding`` looks tokens up with ``F.embedding``, whose backward pass
builds a dense ``[V/tp, h]`` gradient of the whole table (zeroed, then the token rows added) for a
micro-batch that touches a few thousand rows of it. autograd hands that tensor to the parameter,
and megatron DDP's hook adds it into the float32 ``main_grad``. With a tied embedding at one
pipeline stage it is first summed with the output layer's dummy gradient (zeros). At Llama-3.1-8B
that is a 128,256 x 4,096 table: two to four passes over 0.5 billion elements per micro-batch, for
``tokens x h`` values.

:func:`fuse_gradient` makes the lookup's backward pass add the token rows' gradients into
``main_grad`` (``index_add_``, in float32), as megatron's linear layers do with their weight
gradients under ``gradient_accumulation_fusion``, and follow their contract with DDP: it sets
``grad_added_to_main_grad`` and hands autograd a dummy gradient (uninitialised), so DDP's hook
adds nothing (and, with ``overlap_grad_reduce``, still sees the parameter ready). With a tied
embedding at one stage the output layer already hands autograd its dummy; the lookup hands none,
and the weight's ``zero_out_wgrad`` (megatron's guard that the two dummies sum to zeros) is
turned off, so that dummy needs no zeroing either.

Why: the unfused path makes four passes over the whole ``[vocab, hidden]`` weight per micro-batch
(zeroing a dummy, the dense gradient, the sum and the add into the buffer); the fused update
touches only the looked-up rows.

Where it does not run: ``deterministic_mode`` (megatron's indexing lookup, whose backward is
deterministic; ``index_add_`` on a GPU sums with atomics), and any forward pass of a weight with
no ``main_grad`` (a teacher, a model outside DDP), which takes megatron's own lookup.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F


class _Lookup(torch.autograd.Function):
    """``F.embedding(ids, weight)`` whose backward adds the rows' gradients into ``weight.main_grad``."""

    @staticmethod
    def forward(ctx, ids, weight, shared):
        ctx.save_for_backward(ids)
        ctx.weight, ctx.shared = weight, shared
        return F.embedding(ids, weight)

    @staticmethod
    def backward(ctx, grad):
        (ids,) = ctx.saved_tensors
        weight = ctx.weight
        main_grad = weight.main_grad
        main_grad.index_add_(0, ids.reshape(-1), grad.reshape(-1, grad.shape[-1]).to(main_grad.dtype))
        if not hasattr(weight, "grad_added_to_main_grad"):   # megatron's linear returns None too
            return None, None, None
        weight.grad_added_to_main_grad = True
        # the output layer of this stage hands autograd the shared weight's dummy
        dummy = None if ctx.shared else torch.empty_like(weight)
        return None, dummy, None


def _forward(self, input_):
    """megatron's ``VocabParallelEmbedding.forward`` with the lookup of :class:`_Lookup`."""
    from megatron.core.tensor_parallel.mappings import (
        reduce_from_tensor_model_parallel_region,
        reduce_scatter_to_sequence_parallel_region,
    )

    if not hasattr(self.weight, "main_grad") or not torch.is_grad_enabled():  # no backward into a buffer
        return self._megatron_forward(input_)
    split = self.tp_group.size() > 1
    if split:  # ids outside this rank's rows look up row 0, and their output is zeroed
        outside = (input_ < self.vocab_start_index) | (input_ >= self.vocab_end_index)
        input_ = (input_ - self.vocab_start_index).masked_fill_(outside, 0)
    output = _Lookup.apply(input_, self.weight, self._shared_in_stage)
    if split:
        output = output.masked_fill(outside[..., None], 0.0)
    if self.reduce_scatter_embeddings:  # [b, s, h] -> [s, b, h], scattered over the sequence
        return reduce_scatter_to_sequence_parallel_region(output.transpose(0, 1).contiguous(),
                                                          group=self.tp_group)
    return reduce_from_tensor_model_parallel_region(output, group=self.tp_group)


def fuse_gradient(embedding) -> None:
    """Give a built model's ``VocabParallelEmbedding`` the fused backward pass (see the module's
    docstring). Call it after the ``GPTModel`` is built (megatron marks a tied weight then)."""
    if embedding.deterministic_mode:
        return
    weight = embedding.weight
    embedding._shared_in_stage = bool(getattr(weight, "zero_out_wgrad", False))
    if embedding._shared_in_stage:
        # no autograd gradient reaches the weight but the output layer's dummy: nothing to zero
        weight.zero_out_wgrad = False
    embedding._megatron_forward = embedding.forward
    embedding.forward = types.MethodType(_forward, embedding)
