"""Run a stage's invocations here, under ``torchrun`` when it uses several processes.

An invocation whose every output is up to date (:func:`pipelines.stages.base.up_to_date`)
starts no process.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
from functools import partial

from pipelines.core.experiment import REPO
from pipelines.core.processes import die_with
from pipelines.launch.plan import invocations, parse, python_executable, stage_processes
from pipelines.launch.preflight import compose_pipeline
from pipelines.stages import get
from pipelines.stages.base import Stage, skip_line, up_to_date


def run_local(stage: str, cfg, overrides: list[str]) -> None:
    _, processes = stage_processes(stage, cfg)
    declared = get(parse(stage)[0])
    for arguments in invocations(stage, cfg, overrides):
        if _up_to_date(declared, arguments[1:]):
            continue
        if declared.distributed and processes > 1:
            command = [python_executable(cfg), "-m", "torch.distributed.run", f"--nproc-per-node={processes}",
                       f"--master-port={_free_port()}", *arguments]
        else:
            command = [python_executable(cfg), *arguments]
        print(f"[{stage}] {shlex.join(command)}", flush=True)
        # the stage dies with this launcher: killed, it leaves nothing running that still writes
        result = subprocess.run(command, cwd=REPO, preexec_fn=partial(die_with, os.getpid(), signal.SIGTERM))
        if result.returncode != 0:
            raise SystemExit(result.returncode)


def _up_to_date(declared: Stage, overrides: list[str]) -> bool:
    """Whether every output of one invocation is up to date (:func:`pipelines.stages.base.up_to_date`,
    the check the stage makes first): then say so, as the stage would, and start no process (a
    Python, its imports and the runtime: seconds each). What this check cannot settle (a missing
    input, a bad value) is left to the stage, which reports it by its key."""

    try:
        cfg = compose_pipeline(overrides)
        outputs = [up_to_date(declared, one) for one in (declared.each(cfg) if declared.each else [cfg])]
    except Exception:  # noqa: BLE001  (the stage runs, and reports it)
        return False
    if not all(outputs):
        return False
    for output in outputs:
        print(skip_line(declared, output), flush=True)
    return True


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
