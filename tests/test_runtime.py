"""Launch environments: torchrun, SLURM and a plain process all give rank, world and master."""

import pytest

from pipelines import runtime


@pytest.mark.parametrize("nodelist,first", [
    ("gpu[003-005,009]", "gpu003"), ("node7", "node7"), ("a[1,4],b2", "a1"), ("x-[10-12]", "x-10"),
])
def test_first_slurm_host(nodelist, first):
    assert runtime._first_slurm_host(nodelist) == first


def test_slurm_environment(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "16")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[010-011]")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    assert runtime._launch_environment() == (5, 16, 1)
    import os

    assert os.environ["MASTER_ADDR"] == "gpu010" and os.environ["MASTER_PORT"] == str(20000 + 4242)


def test_torchrun_environment_wins(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("SLURM_PROCID", "0")
    assert runtime._launch_environment() == (1, 2, 1)
