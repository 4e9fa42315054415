"""SLURM's USR1 before the time limit: every stage exits 75 for requeue, and a failed requeue is no success."""

import os
import signal
import stat
import subprocess
import sys

from helpers import REPO, compose

from pipelines.launch import cli, slurm
from pipelines.training import preemption


def test_a_stage_with_no_partial_work_exits_75_on_usr1(tmp_path):
    marker = tmp_path / "requeue"
    code = ("import os, signal, time\n"
            "from pipelines.training import preemption\n"
            "preemption.install_default()\n"
            "os.kill(os.getpid(), signal.SIGUSR1)\n"
            "time.sleep(30)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PD_REQUEUE_MARKER": str(marker)})
    assert result.returncode == preemption.REQUEUE_EXIT, result.stderr[-2000:]
    assert marker.exists() and "exiting for requeue" in result.stdout


def test_every_stage_script_installs_the_handler(tmp_path):
    previous = signal.getsignal(signal.SIGUSR1)
    try:
        try:   # any stage; the report of an empty run is enough
            cli.run_stage("report", compose("pipeline", [f"paths.runs={tmp_path}"]))
        except SystemExit:
            pass
        assert signal.getsignal(signal.SIGUSR1) not in (previous, signal.SIG_DFL)
    finally:
        signal.signal(signal.SIGUSR1, previous)


def _run_batch_steps(tmp_path, scontrol_status: int) -> subprocess.CompletedProcess:
    """The batch script's own step function, with a stage that exits 75 and a fake scontrol."""
    cfg = compose("pipeline", ["experiment=llama31_8b_width_4b", "cluster=slurm", f"paths.runs={tmp_path / 'runs'}"])
    script = slurm.sbatch_script("prune", cfg, [])
    body = [line for line in script.splitlines() if not line.startswith(("step ", "#SBATCH", "cd "))]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "scontrol"
    fake.write_text(f"#!/bin/bash\nexit {scontrol_status}\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    test = tmp_path / "batch.sh"
    test.write_text("\n".join(body + ["step bash -c 'exit 75'", "echo reached-the-end"]) + "\n")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "x"}
    return subprocess.run(["bash", str(test)], capture_output=True, text=True, timeout=60, env=env)


def test_a_requeued_job_ends_well_and_a_failed_requeue_does_not(tmp_path):
    done = _run_batch_steps(tmp_path, 0)
    assert done.returncode == 0 and "requeueing job 7" in done.stdout and "reached-the-end" not in done.stdout
    failed = _run_batch_steps(tmp_path, 1)
    assert failed.returncode == preemption.REQUEUE_EXIT, failed.stdout + failed.stderr
    assert "scontrol requeue failed" in failed.stdout
