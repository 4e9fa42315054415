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
    assert width["layouts"]["distill"]["tensor"] == 8 and width["layouts"]["prune"]["tensor"] == 1
    depth = preflight.check(compose("pipeline", ["experiment=llama31_8b_depth_4b"]), ["prune", "distill"])
    assert depth["student"]["num_layers"] == 16
    found = preflight.check(compose("pipeline", ["experiment=llama31_8b_search_4b"]), ["prune", "distill"])
    # planned with the largest shape within 4.5B parameters (the search may choose a smaller one)
    from pipelines.pruning import search

    assert 4.4e9 < search.counted(found["student"]) <= 4.5e9 and found["student"]["num_attention_heads"] == 32
    assert found["layouts"]["prune"]["tensor"] == 1 and found["layouts"]["distill"]["tensor"] == 8
    cfg = compose("pipeline", ["experiment=llama31_8b_width_4b"])
    assert (cfg.distill.global_batch_size, cfg.distill.sequence_length, cfg.distill.lr, cfg.distill.min_lr) == \
        (128, 8192, 1e-4, 1e-5)


@pytest.mark.parametrize("overrides, key", [
    (["cluster.tasks_per_node=6"], "parallel"),                      # 6 GPUs cannot hold TP=8
    (["cluster.nodes=2", "distill.global_batch_size=127"], "distill.global_batch_size"),  # dp=2
    (["prune.target.hidden_size=5000"], "prune.target.hidden_size"),
    (["run.stage_parallel.prune.tensor=2"], "run.stage_parallel.prune"),
])
def test_bad_experiment_names_the_key(overrides, key):
    cfg = compose("pipeline", ["experiment=llama31_8b_width_4b", *overrides])
    with pytest.raises(UserError, match=rf"\(fix: [^)]*{key}"):
        preflight.check(cfg, plan.pipeline_stages(cfg))


def test_pipeline_dry_run_prints_chained_sbatch_scripts():
    result = run_script("scripts/stage.py", "pipeline", "experiment=llama31_8b_width_4b", "--dry-run")
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    stages = ["prepare", "import", "correct", "prune", "logits", "distill", "quantize", "eval", "speed", "report",
              "export"]
    assert [line.split()[2].rstrip(":") for line in out.splitlines() if line.startswith("# ----")] == stages
    assert out.count("--dependency=afterok:") == len(stages) - 1
    assert "#SBATCH --signal=B:USR1@300" in out and "#SBATCH --requeue" in out
    assert "srun --kill-on-bad-exit=1 --ntasks-per-node=8 --nodes=1" in out
    assert "scripts/distill.py experiment=llama31_8b_width_4b prune=width" in out


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
