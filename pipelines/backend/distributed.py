"""The distributed runtime: process group, megatron parallel state, seeds and the version check.

Every stage starts with :func:`initialize`, whatever launched it: a plain ``python`` process,
``torchrun`` (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``) or SLURM ``srun`` (``SLURM_PROCID``,
``SLURM_NTASKS``, ``SLURM_LOCALID``, master address from ``SLURM_JOB_NODELIST``). It uses NCCL on
GPUs and gloo on CPU, where :mod:`pipelines.backend.cpu_shims` is applied first. Stage code never branches
on the parallel layout; it asks this module for the layout (and :mod:`pipelines.model.spec` for the layer spec), and moves data
onto the device with :meth:`Layout.place` (the one place a batch crosses to the GPU).

**Tested versions.** megatron-core and ModelOpt change their internals between releases (the
CPU shims, the layer specs, ModelOpt's Minitron plugin). :func:`check_versions` stops at start
when the installed or the imported ones are not the tested ones, or transformer-engine is outside
megatron-core's declared range, unless ``PIPELINES_ALLOW_UNTESTED_VERSIONS=1``.
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

from pipelines.backend import cpu_shims, writer_queue
from pipelines.backend.kernels import keep_freed_memory
from pipelines.core.errors import UserError, require

# The versions this code was tested with (requirements.txt and the Dockerfile pin the same).
TESTED_VERSIONS = {"megatron-core": "0.16.1", "nvidia-modelopt": "0.43.0"}
# transformer-engine, where installed (GPU images): the range megatron-core 0.16.1 declares in its
# pyproject.toml (``transformer-engine>=2.9,<2.12``, its ``dev`` extra)
TRANSFORMER_ENGINE = ("2.9", "2.12")


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

    def place_module(self, module: torch.nn.Module) -> torch.nn.Module:
        """``module``'s parameters and buffers on this process's device (a model loaded on the host,
        such as a Hugging Face one; megatron models are built on their device)."""
        return module.to(self.device)

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


def launch_rank() -> int:
    """This process's rank as its launcher set it (torchrun, SLURM; 0 for a plain process), before
    any process group exists."""
    env = os.environ
    if "RANK" in env:
        return int(env["RANK"])
    return int(env.get("SLURM_PROCID", 0)) if "SLURM_NTASKS" in env else 0


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
    export) say False, since retained blocks only raise their peak (``bench/import_memory.py``).
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


def check_versions() -> dict:
    """Stop when megatron-core or ModelOpt is not the tested version (see :data:`TESTED_VERSIONS`),
    as installed (package metadata) or as imported (the module's own version: a source checkout
    earlier on ``sys.path``, as NGC images carry one of Megatron-LM, shadows the installed
    package), or when transformer-engine is installed outside the range the tested megatron-core
    declares (:data:`TRANSFORMER_ENGINE`). Returns ``{package: (version, path)}`` of what is imported."""
    from importlib.metadata import PackageNotFoundError, version

    import megatron.core
    import modelopt

    imported = {"megatron-core": (megatron.core.__version__, os.path.dirname(megatron.core.__file__)),
                "nvidia-modelopt": (modelopt.__version__, os.path.dirname(modelopt.__file__))}
    te = transformer_engine_version()
    if te is not None:
        imported["transformer-engine"] = te
    if os.environ.get("PIPELINES_ALLOW_UNTESTED_VERSIONS", "0") == "1":
        return imported
    wrong = []
    for package, tested in TESTED_VERSIONS.items():
        try:
            installed = version(package)
        except PackageNotFoundError:
            installed = "not installed"
        if installed != tested:
            wrong.append(f"{package} {installed} (tested: {tested})")
        elif imported[package][0] != tested:
            wrong.append(f"{package} {tested} is installed but {imported[package][0]} is imported from "
                         f"{imported[package][1]} (earlier on sys.path / PYTHONPATH)")
    if te is not None and not _in_range(te[0], TRANSFORMER_ENGINE):
        wrong.append(f"transformer-engine {te[0]} at {te[1]} (megatron-core {TESTED_VERSIONS['megatron-core']} "
                     f"declares {TRANSFORMER_ENGINE[0]} <= version < {TRANSFORMER_ENGINE[1]})")
    if wrong:
        raise UserError("untested library versions: " + "; ".join(wrong) + ". Install the tested ones "
                        "(pip install " + " ".join(f"{p}=={v}" for p, v in TESTED_VERSIONS.items())
                        + "; the Dockerfile's image has them) or set PIPELINES_ALLOW_UNTESTED_VERSIONS=1 "
                        "at your own risk", "the Python environment")
    return imported


def transformer_engine_version() -> tuple[str, str] | None:
    """``(version, path)`` of the installed transformer-engine (None: absent). Read from its
    package metadata and its location without importing it (its import loads CUDA libraries)."""
    import importlib.util
    from importlib.metadata import PackageNotFoundError, version

    spec = importlib.util.find_spec("transformer_engine")
    if spec is None:
        return None
    for name in ("transformer-engine", "transformer_engine", "transformer-engine-cu12", "transformer-engine-cu13"):
        try:
            return version(name), os.path.dirname(spec.origin or "") or str(spec.submodule_search_locations)
        except PackageNotFoundError:
            continue
    return "unknown", str(spec.origin)


def _in_range(found: str, bounds: tuple[str, str]) -> bool:
    from packaging.version import InvalidVersion, Version

    try:
        # a local or dev build (2.10.0+abc123, 2.11.0.dev0) counts as its release
        release = Version(Version(found).base_version)
    except InvalidVersion:
        return False
    return Version(bounds[0]) <= release < Version(bounds[1])


