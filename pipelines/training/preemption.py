"""Preemption: on SIGUSR1 (SLURM's warning before the time limit) a stage checkpoints and exits 75.

:func:`install` sets a flag from the signal handler; long stages poll :func:`requested` at safe
points (after an optimizer step, after a cache shard), save, and raise ``SystemExit(75)``. The
batch script (:mod:`pipelines.launch.main`) then requeues the job, which resumes.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import torch

REQUEUE_EXIT = 75
_flag = {"set": False}


def install_default() -> None:
    """Every stage process's first handler: on SIGUSR1, stop and exit 75 for requeue. A stage that
    keeps partial work (logits, distill) replaces it with :func:`install`; any other one loses only
    its staging folder, which the requeued run clears (the stages finished before it skip)."""
    def handler(signum, frame):
        print("[preemption] SIGUSR1: this stage keeps no partial work; exiting for requeue", flush=True)
        leave_for_requeue()

    signal.signal(signal.SIGUSR1, handler)


def install() -> None:
    def handler(signum, frame):
        _flag["set"] = True
        print("[preemption] SIGUSR1: will checkpoint and exit for requeue", flush=True)

    signal.signal(signal.SIGUSR1, handler)


def leave_for_requeue() -> None:
    """Exit with status 75 after touching ``$PD_REQUEUE_MARKER`` (the batch script's cue to requeue,
    robust to srun reporting another status when it stops the other tasks)."""
    marker = os.environ.get("PD_REQUEUE_MARKER")
    if marker:
        Path(marker).parent.mkdir(parents=True, exist_ok=True)
        Path(marker).touch()
    raise SystemExit(REQUEUE_EXIT)


def requested(collective: bool = True) -> bool:
    """Whether any rank was signalled (``collective``: agreed over all ranks; all must call)."""
    if not collective or not torch.distributed.is_initialized():
        return _flag["set"]
    # NCCL reduces device tensors only; gloo host tensors (the backend decides, not the node)
    nccl = torch.distributed.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    flag = torch.tensor([1.0 if _flag["set"] else 0.0], device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item())
