"""Kernels megatron-core falls back from without transformer-engine or apex, and allocator tuning.

Each function puts torch's fused kernel where megatron would loop in Python or skip a fusion
(gradient clipping, gradient-accumulation fusion, Adam), keeping megatron's own where TE or apex
is present; :func:`transformer_engine_available` is the one probe for TE.
"""

from __future__ import annotations

import functools
import os

import torch


def fused_grad_clipping() -> bool:
    """Give megatron's gradient clipping torch's fused per-tensor kernels where it would loop in Python.

    Without transformer-engine or apex, megatron-core 0.16's ``clip_grads`` falls back to two loops:

    - the norm, ``local_multi_tensor_l2_norm``, turns each gradient's norm into a Python float on
      the host: one device synchronisation per parameter tensor every step (122 for a 20-layer
      SmolLM2 student, 195 for Llama-3.1-8B), each stalling the queue of kernels the host has
      launched ahead. It becomes torch's fused per-tensor norms (``torch._foreach_norm``, what
      ``torch.nn.utils.clip_grad_norm_`` uses) and the total on the device, the same value in the
      same ``[1]`` float32 tensor; megatron still reads the total once, after its all-reduce;
    - the scaling by the clip coefficient, ``local_multi_tensor_scale``, writes each gradient
      times the coefficient to a new tensor and copies it back (two passes and an allocation per
      tensor). It becomes one in-place ``torch._foreach_mul_``.

    With TE or apex, megatron's own kernels stay. The training stages call it before building
    their optimizer. Returns whether both are in place.
    """
    from megatron.core import utils as megatron_utils
    from megatron.core.optimizer import clip_grads

    if clip_grads.l2_norm_impl is megatron_utils.local_multi_tensor_l2_norm:
        clip_grads.l2_norm_impl = _device_l2_norm
    if clip_grads.multi_tensor_scale_impl is megatron_utils.local_multi_tensor_scale:
        clip_grads.multi_tensor_scale_impl = _scale_in_place
    return clip_grads.l2_norm_impl is _device_l2_norm and clip_grads.multi_tensor_scale_impl is _scale_in_place


def _device_l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """``local_multi_tensor_l2_norm``'s contract (the total L2 norm of ``tensor_lists[0]`` as a
    float32 ``[1]`` tensor, and None), without reading anything on the host."""
    norms = torch._foreach_norm(tensor_lists[0], 2.0)
    return torch.linalg.vector_norm(torch.stack(norms).float()).reshape(1), None


def _scale_in_place(chunk_size, noop_flag, tensor_lists, scale):
    """``local_multi_tensor_scale``'s contract (each ``tensor_lists[1][i] = tensor_lists[0][i] ·
    scale``): in place in one fused pass where the two lists hold the same tensors (the clipping's
    case), else megatron's loop."""
    from megatron.core import utils as megatron_utils

    sources, targets = tensor_lists
    if len(sources) == len(targets) and all(a is b for a, b in zip(sources, targets)):
        torch._foreach_mul_(targets, scale)
    else:
        megatron_utils.local_multi_tensor_scale(chunk_size, noop_flag, tensor_lists, scale)


def gradient_accumulation_fusion() -> str:
    """Let megatron's linear layers add their weight gradients straight into the DDP buffer.

    With ``gradient_accumulation_fusion`` (Megatron-LM's default where it can), each linear
    layer's backward pass accumulates ``grad_output^T · input`` into the parameter's ``main_grad``
    (the DDP buffer) inside the GEMM, instead of writing a new gradient tensor that DDP's hook then
    adds to the buffer: one pass over the layer's weights fewer. (megatron still hands autograd a
    weight-sized dummy gradient, uninitialised, so the allocation stays; megatron zeroes it for a
    tied embedding, which :mod:`pipelines.ops.embedding` makes unnecessary and turns off.)
    TE's linear layers do it themselves; megatron's (the local spec's, and the output layer on
    either spec) call apex's ``fused_weight_gradient_mlp_cuda``. Where apex is missing (CPU, and
    GPU images without it) this installs the same two functions on torch's ``addmm_``
    (:class:`_TorchWeightGradient`), so the flag can be on everywhere. Training stages call it
    before building the model (megatron refuses the flag at construction without a kernel).
    Returns which kernel runs: ``"apex"`` or ``"torch"``.

    On a GPU the pass it saves is a bf16 read and a float32 read-modify-write of every weight per
    micro-batch, memory-bound.
    """
    from megatron.core.tensor_parallel import layers

    if getattr(layers, "fused_weight_gradient_mlp_cuda", None) is _TorchWeightGradient:
        return "torch"
    if layers._grad_accum_fusion_available:
        return "apex"
    layers.fused_weight_gradient_mlp_cuda = _TorchWeightGradient
    layers._grad_accum_fusion_available = True
    return "torch"


class _TorchWeightGradient:
    """apex's ``fused_weight_gradient_mlp_cuda`` contract on torch: ``main_grad += grad_output^T ·
    input`` for 2-D ``input [tokens, in]`` and ``grad_output [tokens, out]``. With inputs in the
    buffer's dtype the sum happens inside the GEMM (``addmm_``). 16-bit inputs into a float32
    buffer (``grad_reduce_in_fp32``) have no mixed-dtype GEMM in torch: the product is taken in
    their dtype and added, the same rounding as megatron's path without the fusion (apex's kernel
    accumulates that product in float32)."""

    @staticmethod
    def wgrad_gemm_accum_fp32(total_input: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor):
        if total_input.dtype == main_grad.dtype:
            main_grad.addmm_(grad_output.t(), total_input)
        else:
            main_grad.add_(grad_output.t().matmul(total_input))

    wgrad_gemm_accum_fp16 = wgrad_gemm_accum_fp32


def torch_adams(optimizer) -> list:
    """The plain ``torch.optim.Adam`` (or ``AdamW``) inside megatron's optimizer wrappers: its
    fallback without transformer-engine or apex (TE's and apex's FusedAdam are not found)."""
    wrappers = getattr(optimizer, "chained_optimizers", [optimizer])
    return [inner for inner in (getattr(w, "optimizer", None) for w in wrappers)
            if isinstance(inner, torch.optim.Adam)]


def fused_torch_adam(optimizer) -> int:
    """Run megatron's torch Adam fallback with torch's fused kernel; returns how many were switched.

    megatron builds ``torch.optim.AdamW`` with torch's default implementation: per parameter
    tensor, about six passes over it (``for`` loops on CPU, ``foreach`` lists on a GPU). The
    fused kernel (CPU and CUDA alike) updates parameter and moments in one pass and keeps the step
    count on the parameter's device. Same update up to float rounding. Called where the optimizer is built
    and again after a checkpoint is loaded (which puts back the saved step counts on the host).
    """
    adams = torch_adams(optimizer)
    for adam in adams:
        for group in adam.param_groups:
            group["fused"], group["foreach"] = True, False
            for parameter in group["params"]:
                state = adam.state.get(parameter)
                if state and "step" in state:
                    state["step"] = state["step"].to(device=parameter.device, dtype=torch.float32)
    return len(adams)


def keep_freed_memory() -> None:
    """CPU runs: stop glibc returning freed memory to the OS after every large tensor.

    By default each large tensor is its own ``mmap`` and each free an ``munmap``, so every forward
    pass page-faults its activations in again, much of it kernel time. Raising the mmap and trim
    thresholds keeps freed blocks for reuse.
    """
    import ctypes
    import ctypes.util

    if os.environ.get("PIPELINES_KEEP_FREED_MEMORY", "1") == "0":  # benchmarks measuring RSS peaks
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 1 << 30)         # M_MMAP_THRESHOLD: only blocks over 1 GiB get their own mmap
        libc.mallopt(-1, (1 << 31) - 1)   # M_TRIM_THRESHOLD: keep up to 2 GiB of free heap
        libc.mallopt(-2, 1 << 30)         # M_TOP_PAD: grow the heap in 1 GiB steps (address space)
    except (OSError, AttributeError):     # not glibc: nothing to tune
        pass


@functools.cache
def transformer_engine_available() -> bool:
    """True when transformer-engine imports (and a GPU is present to run it); probed once a
    process (model inputs ask it on every forward pass, and a failed import is not remembered)."""
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except Exception:
        return False
    return True
