"""megatron's checkpoint writer's results queue, served by a process that dies with ours.

megatron-core's ``torch_dist`` save (``FileSystemWriterAsync``, used for synchronous saves too)
takes its results queue from a ``multiprocessing`` manager, a spawned server process started on a
process's first save. It is shut down when that process exits normally. Killed (``kill -9``, the
OOM killer, torchrun stopping the other ranks after one failed, SIGTERM without a handler), the
process leaves the server behind for good: an orphan holding ~290 MB (it imports the stage
script's modules), one per rank and crash. SLURM reaps a job's processes; a machine without it
keeps them.

:func:`install` (called by :func:`pipelines.backend.distributed.initialize`, so every stage is covered, and
any save added later) hands megatron :func:`results_queue` as its queue getter: on its first call,
a queue from a manager whose server asks Linux to kill it when its parent dies
(``PR_SET_PDEATHSIG``), and exits at once if the parent is already gone. Elsewhere (no ``prctl``),
or off the main thread (Linux ties the signal to the thread that started the child), megatron's
own manager, as before. Nothing starts before a process's first save.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

from pipelines.core.processes import die_with

_manager = None    # kept: a collected manager shuts its server down
_megatron_getter = None


def install() -> None:
    """Make :func:`results_queue` megatron's writer's queue getter (idempotent; nothing starts)."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    global _megatron_getter
    if filesystem_async._get_write_results_queue is not results_queue:
        _megatron_getter = filesystem_async._get_write_results_queue
        filesystem_async._get_write_results_queue = results_queue


def results_queue():
    """The writer's results queue (one per process, made on the first save): served by a process
    that dies with this one where Linux allows, else by megatron's own manager."""
    global _manager
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
            return _megatron_getter()
        import multiprocessing
        from multiprocessing.managers import SyncManager

        manager = SyncManager(ctx=multiprocessing.get_context("spawn"))   # spawn, as megatron's own
        manager.start(initializer=die_with, initargs=(os.getpid(), signal.SIGKILL))
        filesystem_async._results_queue = manager.Queue()
        _manager = manager
    return filesystem_async._results_queue
