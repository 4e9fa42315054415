"""megatron's checkpoint writer's results queue, served by a process that dies with ours.

megatron-core's ``torch_dist`` save (``FileSystemWriterAsync``, used for synchronous saves too)
takes its results queue from a ``multiprocessing`` manager, a spawned server process started on a
process's first save. It is shut down when that process exits normally. Killed (``kill -9``, the
OOM killer, torchrun stopping the other ranks after one failed, SIGTERM without a handler), the
process leaves the server behind for good: an orphan holding ~290 MB (it imports the stage
script's modules), one per rank and crash. SLURM reaps a job's processes; a machine without it
keeps them.

:func:`install` puts in megatron's place a queue from a manager whose server asks Linux to kill
it when its parent dies (``PR_SET_PDEATHSIG``), and exits at once if the parent is already gone.
Elsewhere (no ``prctl``), or off the main thread (Linux ties the signal to the thread that
started the child), megatron's own manager is left as it is.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

_PR_SET_PDEATHSIG = 1
_manager = None    # kept: a collected manager shuts its server down


def _die_with(parent: int) -> None:
    """The manager server's initializer: SIGKILL when ``parent`` dies."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:   # died before the request took effect
        os._exit(0)


def install() -> bool:
    """Give megatron's writer a results queue whose server dies with this process (once; before
    the first save). Returns whether this process's queue is one."""
    global _manager
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if _manager is not None:
        return True
    if filesystem_async._results_queue is not None or not sys.platform.startswith("linux") \
            or threading.current_thread() is not threading.main_thread():
        return False
    import multiprocessing
    from multiprocessing.managers import SyncManager

    manager = SyncManager(ctx=multiprocessing.get_context("spawn"))   # spawn, as megatron's own
    manager.start(initializer=_die_with, initargs=(os.getpid(),))
    filesystem_async._results_queue = manager.Queue()
    _manager = manager
    return True

