"""SwiGLU in a few passes, for megatron's local layer spec where its compiled SwiGLU is off.

megatron-core's MLP computes ``silu(a)·b`` on the halves ``[a, b]`` of its first linear's output.
On a GPU it uses its fused SwiGLU (``bias_activation_fusion``, ``torch.compile``d): one kernel each
way, and only the input kept for the backward pass. Without it (on CPU: :func:`pipelines.model.build.gpu_fusions`
turns megatron's compiled fusions on only on a GPU; ``torch.compile``'s CPU backend builds C++ at
run time) its unfused code runs through autograd: it keeps the input,
``silu(a)`` and a copy ``b + 0`` (its ``glu_linear_offset``) for the backward pass, and the gradient
of its ``chunk`` is a ``cat`` that copies both halves of the gradient once more.

:class:`SwiGLU` keeps what the fused one keeps (the input) and writes each half of the input
gradient straight into one buffer. It is the same arithmetic in the same order, so its values and
gradients are bit-identical to megatron's unfused code (tested in float32 and bfloat16), with
2·ffn fewer elements kept per token and layer.

megatron's MLP calls an activation *module* on the whole first-linear output when the config's
``use_te_activation_func`` is on and the layer spec gives the module
(``MLPSubmodules.activation_func``); the switch is named after TE's activation, the one module
megatron ships for it. :func:`wanted` says when a config turns it on;
:func:`pipelines.model.spec.layer_spec` puts :class:`SwiGLU` in every local spec.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule

from pipelines.backend import kernels


def wanted(bias_activation_fusion: bool) -> bool:
    """Whether a config routes the MLP activation through :class:`SwiGLU`: not where megatron's
    compiled SwiGLU runs (``bias_activation_fusion``), and not where TE's layer specs (which have no
    activation module) may be built."""

    return not bias_activation_fusion and not kernels.transformer_engine_available()


class _SwiGLU(torch.autograd.Function):
    """``silu(a)·b`` for ``x = [a, b]``; the gradient is ``[g·b·silu'(a), g·silu(a)]``, each half
    computed by the kernels autograd would run for megatron's unfused code, in the same order."""

    @staticmethod
    def forward(ctx, x):
        a, b = x.chunk(2, dim=-1)
        ctx.save_for_backward(x)
        return F.silu(a).mul_(b)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        a, b = x.chunk(2, dim=-1)
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
        grad_a, grad_b = out.chunk(2, dim=-1)
        torch.mul(grad, b, out=grad_a)
        torch.ops.aten.silu_backward.grad_input(grad_a, a, grad_input=grad_a)
        torch.ops.aten.silu.out(a, out=grad_b).mul_(grad)
        return out


class SwiGLU(MegatronModule):
    """megatron's activation-module contract: called on the whole first-linear output
    ``[..., 2·ffn]``, returns ``[..., ffn]`` (a ``MegatronModule``: the MLP asks each child for its
    sharded state dict, empty here)."""

    def __init__(self, config):
        super().__init__(config)
        plain = (config.gated_linear_unit and config.activation_func is F.silu
                 and config.activation_func_clamp_value is None and config.glu_linear_offset == 0.0)
        if not plain:
            raise ValueError("pipelines.ops.swiglu.SwiGLU computes silu(a)·b only: the config asks "
                             "for another gated activation, a clamp or an offset")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _SwiGLU.apply(x)
