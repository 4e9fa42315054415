"""CPU shims for megatron-core 0.16 and ModelOpt 0.43: where the project bends them because there is
no GPU, and only then.

These are not the project's only changes to megatron's behaviour: on any device without TE or
apex, :mod:`pipelines.backend.kernels` puts torch's fused kernels where megatron would loop in
Python (gradient clipping, Adam, the weight-gradient GEMM), and :mod:`pipelines.ops` replaces
megatron modules of the local spec (attention, RoPE, SwiGLU, the embedding's gradient). Those
run on GPUs too and are tested against megatron's own code; what is here runs on CPU alone.

megatron-core assumes CUDA in a handful of places that have nothing to do with the maths. On a
machine without a GPU, :func:`apply` patches exactly those places so the *same* model, schedule,
optimizer and checkpoint code runs on CPU with gloo. With CUDA available it does nothing, and
``tests/unit/test_cpu_shims.py`` checks that.

Each shim was found by running megatron-core and ModelOpt on CPU and is listed in
:data:`SHIMS` with the megatron/ModelOpt call that needs it:

- ``current_device``: ``torch.cuda.current_device()`` returns ``"cpu"`` (rotary embeddings,
  ``tensor_parallel`` helpers move tensors there).
- ``synchronize``: ``torch.cuda.synchronize()`` is a no-op (``dist_checkpointing`` save).
- ``factory_device``: a ``TorchFunctionMode`` rewrites ``device="cuda"`` / ``device=<int>`` in
  torch factory calls to the CPU (pipeline schedules, optimizer).
- ``tensor_type``: ``Tensor.type()`` reports ``torch.cuda.*Tensor`` for CPU tensors, because
  ``clip_grads.py`` and ``distrib_optimizer.py`` assert on those names.
- ``tensor_cuda``: ``Tensor.cuda()`` is the identity (ModelOpt depth pruning, ModelOpt
  distributed helpers).
- ``gloo_allgather_0d``: gloo rejects 0-d inputs to ``all_gather_into_tensor`` that NCCL
  accepts (ModelOpt ``drop_mcore_language_model_layers``); they are reshaped to ``(1,)``.
- ``gloo_one_rank``: ``reduce_scatter_tensor`` and ``all_gather_into_tensor`` over a group of one
  rank copy locally (nothing, when input and output are one buffer). gloo sends the whole buffer
  through its transport instead: with the distributed optimizer at data-parallel size 1 that was
  two whole-model copies per step (measured 2 x 30-90 ms at 99M parameters). NCCL does no such copy.
- ``cuda_rng_state``: ``torch.cuda.get_rng_state()`` returns an empty state (activation
  recompute saves the CUDA RNG next to the CPU one; megatron's setter is queued by torch and never
  runs without CUDA). There is no CUDA RNG to restore on CPU; the CPU RNG is saved as on GPU.

The RNG tracker is handled by :func:`pipelines.backend.distributed.seed_everything`, which calls
``model_parallel_cuda_manual_seed`` on GPU and ``initialize_rng_tracker(force_reset=True)`` on
CPU. The ModelOpt registration of ``torch.nn.RMSNorm`` is needed by the *local* layer spec on any
device, so it lives in :mod:`pipelines.pruning.methods`.
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

SHIMS = (
    "current_device",
    "synchronize",
    "factory_device",
    "tensor_type",
    "tensor_cuda",
    "gloo_allgather_0d",
    "gloo_one_rank",
    "cuda_rng_state",
)

_applied: list[str] = []
_factory_mode: TorchFunctionMode | None = None


def _is_cuda_device(device) -> bool:
    if isinstance(device, bool):
        return False
    if isinstance(device, int):
        return True
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return False


class _CudaFactoryToCpu(TorchFunctionMode):
    """Rewrites ``device=cuda`` keyword arguments of any torch call to ``cpu``."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = dict(kwargs, device="cpu")
        return func(*args, **kwargs)


def _one_rank(output: torch.Tensor, input: torch.Tensor, async_op: bool):
    """A reduce-scatter or all-gather over one rank: the input is the output. gloo would copy it
    through its transport even when both are one buffer (the distributed optimizer's case)."""
    if output.data_ptr() != input.data_ptr() or output.shape != input.shape:
        output.copy_(input.reshape(output.shape))
    if not async_op:
        return None
    future = torch.futures.Future()
    future.set_result(None)
    return _DoneWork(future)


class _DoneWork:
    """What an ``async_op=True`` collective returns, already complete."""

    def __init__(self, future):
        self._future = future

    def wait(self, timeout=None) -> bool:
        return True

    def is_completed(self) -> bool:
        return True

    def get_future(self):
        return self._future


def applied() -> list[str]:
    """Names of the shims applied in this process so far."""
    return list(_applied)


def apply(force: bool = False) -> list[str]:
    """Apply every shim once if CUDA is unavailable (or ``force``); return the names applied."""
    global _factory_mode
    if _applied or (torch.cuda.is_available() and not force):
        return applied()

    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *args, **kwargs: None

    _factory_mode = _CudaFactoryToCpu()
    _factory_mode.__enter__()

    original_type = torch.Tensor.type

    def tensor_type(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs:
            name = original_type(self)
            if self.device.type == "cpu" and name.startswith("torch.") and ".cuda." not in name:
                return "torch.cuda." + name[len("torch."):]
            return name
        return original_type(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = tensor_type
    torch.Tensor.cuda = lambda self, *args, **kwargs: self

    import torch.distributed as dist

    original_all_gather = dist.all_gather_into_tensor
    original_reduce_scatter = dist.reduce_scatter_tensor

    def all_gather_into_tensor(output_tensor, input_tensor, group=None, async_op=False):
        if input_tensor.dim() == 0:
            input_tensor = input_tensor.reshape(1)
        if dist.get_world_size(group) == 1:
            return _one_rank(output_tensor, input_tensor, async_op)
        return original_all_gather(output_tensor, input_tensor, group=group, async_op=async_op)

    def reduce_scatter_tensor(output, input, op=dist.ReduceOp.SUM, group=None, async_op=False):
        if dist.get_world_size(group) == 1:
            return _one_rank(output, input, async_op)
        return original_reduce_scatter(output, input, op=op, group=group, async_op=async_op)

    dist.all_gather_into_tensor = all_gather_into_tensor
    dist.reduce_scatter_tensor = reduce_scatter_tensor
    # megatron's DDP binds the two at import: the distributed optimizer's reduce-scatter of the
    # gradient buffer and all-gather of the parameters, whole-model copies through gloo at dp=1
    from megatron.core.distributed import param_and_grad_buffer

    param_and_grad_buffer.dist_reduce_scatter_func = reduce_scatter_tensor
    param_and_grad_buffer.dist_all_gather_func = all_gather_into_tensor

    def no_cuda_rng_state(device="cuda"):
        return torch.empty(0, dtype=torch.uint8)

    torch.cuda.get_rng_state = torch.cuda.random.get_rng_state = no_cuda_rng_state
    _applied.extend(SHIMS)
    return applied()
