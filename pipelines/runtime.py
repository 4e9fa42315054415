"""The distributed runtime: process group, megatron parallel state, seeds and the layer spec.

Every stage starts with :func:`initialize`, whatever launched it: a plain ``python`` process,
``torchrun`` (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``) or SLURM ``srun`` (``SLURM_PROCID``,
``SLURM_NTASKS``, ``SLURM_LOCALID``, master address from ``SLURM_JOB_NODELIST``). It uses NCCL on
GPUs and gloo on CPU, where :mod:`pipelines.cpu_shims` is applied first. Stage code never branches
on the parallel layout; it asks this module for the layout and the layer spec, and moves data
onto the device with :meth:`Layout.place` (the one place a batch crosses to the GPU).

**Tested versions.** megatron-core and ModelOpt change their internals between releases (the
CPU shims, the layer specs, ModelOpt's Minitron plugin). :func:`check_versions` stops at start
when the installed ones are not the tested ones, unless ``PIPELINES_ALLOW_UNTESTED_VERSIONS=1``.
"""

from __future__ import annotations

import os
import random
import re
import socket
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from pipelines import cpu_shims, writer_queue
from pipelines.errors import UserError, require

# The versions this code was tested with (requirements.txt and the Dockerfile pin the same).
TESTED_VERSIONS = {"megatron-core": "0.16.1", "nvidia-modelopt": "0.43.0"}


@dataclass(frozen=True)
class Layout:
    """Where this process sits: ranks and the megatron parallel sizes."""

    rank: int
    world_size: int
    local_rank: int
    tensor_parallel: int
    pipeline_parallel: int
    context_parallel: int
    data_parallel: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype models run in: bfloat16 on GPUs, float32 on CPU (no fast bf16 kernels there)."""
        return torch.bfloat16 if self.device.type == "cuda" else torch.float32

    def place(self, data):
        """``data`` (a tensor, or a tuple / list / dict / NamedTuple of them) on this process's device.

        Every stage moves its batches through here, so a batch reaches the model's device by
        construction. On a GPU host tensors are pinned and copied without blocking the host.
        """
        return map_tensors(self._place_tensor, data)

    def _place_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.device == self.device:
            return tensor
        if self.device.type == "cuda" and tensor.device.type == "cpu":
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor.to(self.device)


def map_tensors(function, data):
    """``function`` applied to every tensor of ``data`` (a tensor, or a dict / NamedTuple / list /
    tuple of them, nested); anything else is returned as it is."""
    if isinstance(data, torch.Tensor):
        return function(data)
    if isinstance(data, dict):
        return {key: map_tensors(function, value) for key, value in data.items()}
    if isinstance(data, tuple) and hasattr(data, "_fields"):  # NamedTuple
        return type(data)(*(map_tensors(function, value) for value in data))
    if isinstance(data, (list, tuple)):
        return type(data)(map_tensors(function, value) for value in data)
    return data


def _first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM nodelist such as ``gpu[003-005,009],cpu1`` (no scontrol needed)."""
    match = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist)
    if not match:
        return nodelist
    prefix, _, ranges = match.groups()
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def launch_world_size() -> int:
    """World size the launcher set (torchrun or SLURM; 1 for a plain process), read before
    :func:`initialize` so stages can validate batch sizes without touching the rendezvous."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["WORLD_SIZE"])
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return int(env["SLURM_NTASKS"])
    return 1


def _launch_environment() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun, SLURM, or a plain single process."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        env.setdefault("MASTER_ADDR", _first_slurm_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1")))
        # the batch script exports a free MASTER_PORT per step (launch.FREE_PORT); this fallback
        # (srun by hand) is the same on every rank without talking, so it can collide
        env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    if "MASTER_PORT" not in env:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            env["MASTER_PORT"] = str(sock.getsockname()[1])
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    return 0, 1, 0


def initialize(parallel, seed: int = 1234, reuse_freed_memory: bool = True) -> Layout:
    """Start (or reuse) the process group and megatron parallel state for ``parallel``.

    ``parallel`` is the ``parallel`` config group: ``tensor``, ``pipeline`` and ``context``
    sizes; the data-parallel size is what the world size leaves. ``reuse_freed_memory``: on CPU,
    keep freed memory in the heap (:func:`keep_freed_memory`); one-pass streaming stages (import,
    export) say False, since retained blocks only raise their peak (1.12x -> 1.33x the checkpoint
    in bench/import_memory.py).
    """
    from megatron.core import parallel_state

    check_versions()
    use_cuda = torch.cuda.is_available()
    if not use_cuda:
        cpu_shims.apply()
        if reuse_freed_memory:
            keep_freed_memory()
    writer_queue.install()   # megatron's checkpoint writer leaves no process behind a killed one
    rank, world_size, local_rank = _launch_environment()
    tensor, pipeline = int(parallel.tensor), int(parallel.pipeline)
    context = int(parallel.get("context", 1))
    require_no_context_parallel(context)
    model_parallel = tensor * pipeline * context
    require(
        world_size % model_parallel == 0,
        f"world size {world_size} is not divisible by tensor({tensor}) x pipeline({pipeline}) "
        f"x context({context})",
        "parallel.tensor / parallel.pipeline / parallel.context, or the number of processes",
    )
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(minutes=int(parallel.get("timeout_minutes", 30))),
        )
    if parallel_state.model_parallel_is_initialized() and _model_parallel_sizes() != (tensor, pipeline, context):
        _destroy_model_parallel()
    if not parallel_state.model_parallel_is_initialized():   # the same layout again: its groups are reused
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tensor,
            pipeline_model_parallel_size=pipeline,
            context_parallel_size=context,
        )
    seed_everything(seed)
    return Layout(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        tensor_parallel=tensor,
        pipeline_parallel=pipeline,
        context_parallel=context,
        data_parallel=parallel_state.get_data_parallel_world_size(),
        device=device,
    )


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
      tensor). It becomes one in-place ``torch._foreach_mul_``: measured on CPU for that student,
      107 -> 74 ms an optimizer step that clips (median of 10, alternating).

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
    tied embedding, which :mod:`pipelines.embedding` makes unnecessary and turns off.)
    TE's linear layers do it themselves; megatron's (the local spec's, and the output layer on
    either spec) call apex's ``fused_weight_gradient_mlp_cuda``. Where apex is missing (CPU, and
    GPU images without it) this installs the same two functions on torch's ``addmm_``
    (:class:`_TorchWeightGradient`), so the flag can be on everywhere. Training stages call it
    before building the model (megatron refuses the flag at construction without a kernel).
    Returns which kernel runs: ``"apex"`` or ``"torch"``.

    Measured on CPU (the 20-layer SmolLM2 student, 4x256 tokens a step, 30 alternating steps in
    one process): 1.000x the step time without it; the pass it saves (about 1 ms a layer) is below
    that machine's noise. It is on for the GPU, where that pass is a bf16 read and a float32
    read-modify-write of every weight per micro-batch, memory-bound (not measured there yet).
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
    count on the parameter's device: measured on CPU for the 99M-parameter SmolLM2 student, 184 ->
    75 ms an optimizer step. Same update up to float rounding. Called where the optimizer is built
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


def _model_parallel_sizes() -> tuple[int, int, int]:
    from megatron.core import parallel_state

    return (parallel_state.get_tensor_model_parallel_world_size(),
            parallel_state.get_pipeline_model_parallel_world_size(),
            parallel_state.get_context_parallel_world_size())


def _destroy_model_parallel() -> None:
    """megatron's ``destroy_model_parallel`` forgets its groups but leaves them registered with
    torch, where each gloo group keeps its threads (hundreds, in a process that initialized many
    times); destroy what it leaves, every group but the default one."""
    from megatron.core import parallel_state
    from torch.distributed import distributed_c10d

    parallel_state.destroy_model_parallel()
    registered = getattr(getattr(distributed_c10d, "_world", None), "pg_map", {})
    for group in list(registered):
        if group is not distributed_c10d.GroupMember.WORLD:
            dist.destroy_process_group(group)


def require_no_context_parallel(context: int, stage: str | None = None) -> None:
    """Refuse ``parallel.context > 1``: batches are not split over context-parallel ranks."""
    require(context == 1, f"{stage + ': ' if stage else ''}context parallelism ({context}) is not supported: "
            "batches are not split over context-parallel ranks, so loss and gradients would be wrong; use "
            "tensor or pipeline parallelism (or recompute) for long sequences", "parallel.context")


def keep_freed_memory() -> None:
    """CPU runs: stop glibc returning freed memory to the OS after every large tensor.

    By default each large tensor is its own ``mmap`` and each free an ``munmap``, so every forward
    pass page-faults its activations in again, much of it kernel time. Raising the mmap and trim
    thresholds keeps freed blocks for reuse: measured 13.5 s -> 9.2 s for 57 5-shot MMLU
    questions, and a CE training step 3.26 s -> 1.47 s (bench/distill_step.py's student).
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


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy, torch and megatron's model-parallel RNG tracker."""
    from megatron.core.tensor_parallel import random as tensor_parallel_random

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        tensor_parallel_random.model_parallel_cuda_manual_seed(seed)
    else:
        # model_parallel_cuda_manual_seed reads CUDA RNG state; on CPU the torch RNG is enough and
        # the tracker only has to exist (attention forks it for dropout).
        tensor_parallel_random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)


def shutdown() -> None:
    """Tear down megatron parallel state and the process group."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def check_versions() -> None:
    """Stop when megatron-core or ModelOpt is not the tested version (see :data:`TESTED_VERSIONS`)."""
    from importlib.metadata import PackageNotFoundError, version

    if os.environ.get("PIPELINES_ALLOW_UNTESTED_VERSIONS", "0") == "1":
        return
    wrong = []
    for package, tested in TESTED_VERSIONS.items():
        try:
            installed = version(package)
        except PackageNotFoundError:
            installed = "not installed"
        if installed != tested:
            wrong.append(f"{package} {installed} (tested: {tested})")
    if wrong:
        raise UserError("untested library versions: " + ", ".join(wrong) + "; install the tested ones "
                        "(pip install " + " ".join(f"{p}=={v}" for p, v in TESTED_VERSIONS.items())
                        + ") or set PIPELINES_ALLOW_UNTESTED_VERSIONS=1 at your own risk",
                        "the Python environment")


def transformer_engine_available() -> bool:
    """True when transformer-engine imports (and a GPU is present to run it)."""
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except Exception:
        return False
    return True


SPECS = ("host", "train", "modelopt")


def layer_spec(purpose: str = "train", config=None):
    """The GPT layer spec for ``purpose``; all three write the same checkpoint keys.

    - ``host``: megatron's local spec (plain torch modules). Import and export build on the host
      with it, whatever the node has: no TE module is ever created in host memory.
    - ``train``: transformer-engine's spec when TE and a GPU are present (fused attention, fused
      norm + linear), else the local one with torch's fused attention kernel
      (:class:`pipelines.attention.SDPAttention`). Training, logits, eval and depth pruning use it.
    - ``modelopt``: the spec ModelOpt's width pruning can convert. TE's spec fuses the norms into
      the linears (``input_layernorm`` is an identity there), which ModelOpt 0.43 cannot prune, so
      with TE this is megatron's ModelOpt spec (TE attention and norms, plain linears); without
      TE it is the local spec.

    Checkpoint keys are the TE spec's in every case: the local spec maps its norms to
    ``linear_qkv.layer_norm_weight`` / ``linear_fc1.layer_norm_weight`` in its sharded state dict
    (``sharded_state_dict_keys_map``), and the ModelOpt spec does with ``remap_te_layernorm``.
    TE's ``_extra_state`` (FP8 metadata) is never saved nor asked for
    (:mod:`pipelines.checkpoint`), so a checkpoint loads into any of the three.
    """
    from megatron.core.models.gpt import gpt_layer_specs

    require(purpose in SPECS, f"unknown layer spec purpose {purpose!r}; one of {SPECS}", "layer spec")
    if purpose == "host" or not transformer_engine_available():
        spec = gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm")
        # used where the config's use_te_activation_func is on (pipelines.swiglu.wanted)
        from pipelines.swiglu import SwiGLU

        spec.submodules.mlp.submodules.activation_func = SwiGLU
        if purpose == "train":  # torch's fused attention kernel, not megatron's [b, H, s, s] scores
            from pipelines.attention import SDPAttention

            spec.submodules.self_attention.submodules.core_attention = SDPAttention
        return spec
    if purpose == "modelopt":
        from megatron.core.post_training.modelopt.gpt.model_specs import get_gpt_modelopt_spec

        return get_gpt_modelopt_spec(config, remap_te_layernorm=True)
    return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()
