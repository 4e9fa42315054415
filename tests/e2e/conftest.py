"""The end-to-end tier's fixtures: the demo run and the documented sweeps, built here when missing.

``.ci/run`` builds them first (``make demo`` and the two ``make sweep`` commands of
docs/configuration.md); run alone, this tier builds what is missing, and a build that fails fails
the tests that need it, with its output: nothing here is skipped for want of an earlier step.
"""

from __future__ import annotations

import os
import re
import subprocess

import pytest
from helpers import REPO

DEMO = REPO / "runs" / "demo"


def documented_sweeps() -> list[str]:
    """The ``make sweep EXP=demo`` commands of docs/configuration.md, in order."""
    text = (REPO / "docs" / "configuration.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    return [line.split("  #")[0].strip() for block in blocks for line in block.splitlines()
            if line.startswith("make sweep EXP=demo")]


def build(command: str, what: str) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "PIPELINES_RUNS")}
    result = subprocess.run(["bash", "-c", command], cwd=REPO, capture_output=True, text=True, timeout=3600, env=env)
    if result.returncode:
        pytest.fail(f"{what}: `{command}` failed (exit {result.returncode}):\n"
                    f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}", pytrace=False)


@pytest.fixture(scope="session")
def demo_run():
    """``runs/demo`` as ``make demo`` leaves it (built with its stages when its report is missing)."""
    if not (DEMO / "report.json").exists():
        build("make -s pipeline EXP=demo CLUSTER=local", "the demo run")
    return DEMO


@pytest.fixture(scope="session")
def documented_sweep_points(demo_run):
    """The demo run with the points of docs/configuration.md's two sweeps (each run when missing)."""
    commands = documented_sweeps()
    assert len(commands) == 2, commands
    if not any((demo_run / "sweep").glob("distill.kd_weight=1,fixed-*")):
        build(commands[0], "the first documented sweep")
    if not any((demo_run / "sweep").glob("distill.data_seed=*")):
        build(commands[1], "the second documented sweep")
    return demo_run / "sweep"
