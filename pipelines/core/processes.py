"""Processes that must not outlive the one that started them."""

from __future__ import annotations

import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def die_with(parent: int, sig: int = signal.SIGKILL) -> None:
    """Ask Linux to send ``sig`` to this process when ``parent`` dies; exit at once if it already
    has. A ``preexec_fn`` or a pool initializer; elsewhere than Linux, nothing."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
    if os.getppid() != parent:   # died before the request took effect
        os._exit(0)


def alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
