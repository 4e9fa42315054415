"""Launch environments: torchrun, SLURM and a plain process all give rank, world and master."""

from pathlib import Path

import pytest

from pipelines import runtime


@pytest.mark.parametrize("nodelist,first", [
    ("gpu[003-005,009]", "gpu003"), ("node7", "node7"), ("a[1,4],b2", "a1"), ("x-[10-12]", "x-10"),
])
def test_first_slurm_host(nodelist, first):
    assert runtime._first_slurm_host(nodelist) == first


def test_slurm_environment(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(key, "")    # recorded, so the MASTER_* this test's call sets are undone after it
        monkeypatch.delenv(key)
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


def gloo_threads() -> int:
    """Threads of this process that torch's gloo groups keep (each group has its own)."""
    names = [(task / "comm").read_text().strip() for task in Path("/proc/self/task").iterdir()]
    return sum("gloo" in name for name in names)


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads threads from /proc")
def test_initializing_again_reuses_the_groups_and_leaks_no_threads():
    """Every in-process stage run initializes the runtime; CI's test process once held 4,600
    threads of leaked gloo groups, most of a core in the kernel."""
    from omegaconf import OmegaConf

    single = OmegaConf.create({"tensor": 1, "pipeline": 1})
    runtime.initialize(single)
    first = gloo_threads()
    assert first > 0
    for _ in range(3):
        runtime.initialize(single)
    assert gloo_threads() == first
