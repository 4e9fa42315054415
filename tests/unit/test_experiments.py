"""Every experiment composes and validates with no compute; make targets and SLURM scripts."""

import subprocess

import pytest
from helpers import REPO, compose, run_script

from pipelines.core.errors import UserError
from pipelines.launch import plan, preflight

EXPERIMENTS = sorted(p.stem for p in (REPO / "configs" / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_and_validates(name):
    cfg = compose("pipeline", [f"experiment={name}"])
    checked = preflight.check(cfg, plan.pipeline_stages(cfg))
    assert cfg.run.name == name and checked["layouts"]
    assert cfg.logits.sequence_length == cfg.distill.sequence_length
    assert str(cfg.distill.student).endswith(f"{name}/prune_{cfg.prune.mode}")


def test_minitron_shapes_and_layouts():
    width = preflight.check(compose("pipeline", ["experiment=llama31_8b_width_4b"]), ["prune", "distill"])
    assert (width["student"]["hidden_size"], width["student"]["ffn_hidden_size"],
            width["student"]["num_layers"]) == (3072, 9216, 32)
    # the time plan's choice (bench/time_plan.py): TP=2 x DP=4, not the tutorial's TP=8
    assert (width["layouts"]["distill"]["tensor"], width["layouts"]["distill"]["data"]) == (2, 4)
    assert width["layouts"]["prune"]["tensor"] == 1
    depth = preflight.check(compose("pipeline", ["experiment=llama31_8b_depth_4b"]), ["prune", "distill"])
    assert depth["student"]["num_layers"] == 16
    found = preflight.check(compose("pipeline", ["experiment=llama31_8b_search_4b"]), ["prune", "distill"])
    # planned with the largest shape within 4.5B parameters (the search may choose a smaller one)
    from pipelines.pruning import search

    assert 4.4e9 < search.counted(found["student"]) <= 4.5e9 and found["student"]["num_attention_heads"] == 32
    assert found["layouts"]["prune"]["tensor"] == 1 and found["layouts"]["distill"]["tensor"] == 2
    cfg = compose("pipeline", ["experiment=llama31_8b_width_4b"])
    assert (cfg.distill.global_batch_size, cfg.distill.sequence_length, cfg.distill.lr, cfg.distill.min_lr) == \
        (128, 8192, 1e-4, 1e-5)


@pytest.mark.parametrize("overrides, key", [
    (["cluster.tasks_per_node=6", "parallel.tensor=8"], "parallel"),  # 6 GPUs cannot hold TP=8
    (["cluster.nodes=2", "distill.global_batch_size=127"], "distill.global_batch_size"),  # dp=2
    (["prune.target.hidden_size=5000"], "prune.target.hidden_size"),
    (["run.stage_parallel.prune.tensor=2"], "run.stage_parallel.prune"),
    (["cluster.mem=lots"], "cluster.mem"),
    (["distill.grad_reduce_dtype=fp8"], "distill.grad_reduce_dtype"),
    (["distill.overlap_grad_reduce=maybe"], "distill.overlap_grad_reduce"),
    (["correct.gc_interval=-1"], "correct.gc_interval"),
])
def test_bad_experiment_names_the_key(overrides, key):
    cfg = compose("pipeline", ["experiment=llama31_8b_width_4b", *overrides])
    with pytest.raises(UserError, match=rf"\(fix: [^)]*{key}"):
        preflight.check(cfg, plan.pipeline_stages(cfg))


def test_pipeline_dry_run_prints_chained_sbatch_scripts():
    result = run_script("scripts/stage.py", "pipeline", "experiment=llama31_8b_width_4b", "--dry-run")
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    stages = ["prepare", "import", "correct", "logits", "prune", "distill", "quantize", "eval", "speed", "report",
              "export"]
    assert [line.split()[2].rstrip(":") for line in out.splitlines() if line.startswith("# ----")] == stages
    assert out.count("--dependency=afterok:") == len(stages) - 1
    assert "#SBATCH --signal=B:USR1@300" in out and "#SBATCH --requeue" in out
    assert "srun --kill-on-bad-exit=1 --ntasks-per-node=8 --nodes=1 --cpus-per-task=8" in out
    assert "scripts/distill.py experiment=llama31_8b_width_4b prune=width" in out
    # the time plan before any GPU time: each stage's step time, MFU and wall time, the job's GPU-hours
    assert "[time] predicted on H100" in out and "GPU-hours" in out
    assert next(line for line in out.splitlines() if line.startswith("[time]") and " distill " in line)


@pytest.mark.parametrize("container", [True, False], ids=["container", "venv"])
def test_the_batch_script_launches_in_a_container_and_in_a_venv(container):
    """Each launch flag a cluster job needs, under pyxis and in a plain environment: the image's
    python (the submitting host's interpreter is not in the image), the repository mounted at its
    own path as the working folder, one named container for every step, srun's own
    --cpus-per-task (SLURM >= 22.05 does not inherit sbatch's), a host memory request, this
    checkout's code first on PYTHONPATH, and CUDA_DEVICE_MAX_CONNECTIONS=1 for TP on Hopper."""
    import sys

    from pipelines.launch.slurm import sbatch_script

    extra = ["cluster.container_image=/lustre/images/pipelines.sqsh", "cluster.container_mounts=/lustre:/lustre"]
    cfg = compose("pipeline", ["experiment=llama31_8b_width_4b", *(extra if container else [])])
    script = sbatch_script("distill", cfg, [])
    lines = script.splitlines()
    step = next(line for line in lines if line.startswith("step srun"))
    assert "#SBATCH --mem=0" in lines and "#SBATCH --cpus-per-task=8" in lines
    assert "export CUDA_DEVICE_MAX_CONNECTIONS=1" in lines
    assert f"export PYTHONPATH={REPO}${{PYTHONPATH:+:$PYTHONPATH}}" in lines
    assert " --cpus-per-task=8 " in step
    if container:
        assert " --container-image=/lustre/images/pipelines.sqsh " in step
        assert f" --container-mounts={REPO}:{REPO},/lustre:/lustre " in step
        assert f" --container-workdir={REPO} " in step and " --container-name=pd-llama31_8b_width_4b " in step
        assert " python scripts/distill.py " in step and sys.executable not in step
    else:
        assert "--container" not in script and f" {sys.executable} scripts/distill.py " in step
    bash = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True)
    assert bash.returncode == 0, bash.stderr


def test_make_help_lists_the_targets():
    out = subprocess.run(["make", "help"], cwd=REPO, capture_output=True, text=True).stdout
    for target in ("setup", "test", "demo", "import", "correct", "prune", "logits", "distill", "quantize", "eval",
                   "export", "pipeline"):
        assert f"\n{target} " in "\n" + out, target


def test_each_slurm_step_rendezvous_on_a_port_nobody_listens_on():
    """Two jobs on one node once derived their port from the job id (``20000 + id % 20000``)."""
    import socket
    import subprocess

    from pipelines.launch.slurm import FREE_PORT

    def pick(seed: int) -> int:
        script = f"{FREE_PORT}\nRANDOM={seed}\nfree_port"
        return int(subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True).stdout)

    first = pick(7)
    assert 20000 <= first < 60000 and pick(7) == first  # seeded: the next call would pick it again
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", first))
        listener.listen()
        assert pick(7) != first
