"""make cluster-check: its batch script, and its parts end to end over gloo on CPU (a tiny shape)."""

import json
import subprocess

from helpers import REPO, compose, run_script, run_torchrun

from pipelines.tools import cluster_check


def test_the_job_runs_the_three_layouts_then_compares_them(tmp_path):
    cfg = compose("pipeline", ["experiment=demo", "cluster=slurm", f"paths.runs={tmp_path}",
                               "cluster.container_image=/images/p.sqsh"])
    script = cluster_check.batch_script(cfg, ["cluster=slurm"])
    steps = [line for line in script.splitlines() if line.startswith("srun ")]
    parts = [next(a for a in line.split() if a.startswith("--part=")) for line in steps]
    assert parts == ["--part=model", "--part=train", "--part=train", "--part=train", "--part=compare"]
    assert [next((a for a in line.split() if a.startswith("--tensor=")), None) for line in steps[1:4]] == \
        ["--tensor=8", "--tensor=2", "--tensor=1"]
    assert "--resume" in steps[2] and "--resume" not in steps[1] + steps[3]
    assert all("--cpus-per-task=8" in line and "--container-workdir=" in line and " python " in line
               for line in steps)
    assert "CUDA_DEVICE_MAX_CONNECTIONS=1" in script and f"#SBATCH --output={tmp_path}/cluster_check/" in script
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    refused = run_script("scripts/cluster_check.py", "cluster=local")
    assert refused.returncode == 2 and "(fix: CLUSTER)" in refused.stderr


def test_the_parts_agree_across_tensor_parallel_sizes_on_gloo(tmp_path, tiny_data):
    """model, train at TP=2 (with the checkpoint resume) and TP=1 on 2 gloo processes, compare:
    the same losses and gradient norms within bf16 tolerance, the resumed steps equal."""
    common = ["--shape=demo", "model=tiny", "model.vocab_size=300", f"paths.runs={tmp_path}",
              f"data.output={tiny_data}", "distill.sequence_length=64"]
    model = run_script("scripts/cluster_check.py", "--part=model", *common)
    assert model.returncode == 0, model.stderr[-3000:]
    for tensor in (2, 1):
        extra = ["--resume"] if tensor == 2 else []
        result = run_torchrun(2, "scripts/cluster_check.py", "--part=train", f"--tensor={tensor}", *extra, *common)
        assert result.returncode == 0, result.stderr[-3000:]
    results = tmp_path / "cluster_check" / "job-local"
    two = json.loads((results / "tp2.json").read_text())
    assert (two["tensor"], two["data"], len(two["steps"])) == (2, 1, cluster_check.STEPS)
    assert two["resume"]["equal"] and two["predicted_gb"] > 0 and two["predicted_seconds"] > 0
    compared = run_script("scripts/cluster_check.py", "--part=compare", *common)
    assert compared.returncode == 0, compared.stdout + compared.stderr[-3000:]
    assert "PASS: 2 layouts" in compared.stdout and "(no GPU: time and memory not judged)" in compared.stdout
    # a wrong gradient at one layout fails the verdict, naming it
    one = json.loads((results / "tp1.json").read_text())
    one["steps"][3]["grad_norm"] *= 1.5
    (results / "tp1.json").write_text(json.dumps(one))
    lines, ok = cluster_check.compare(results, timed=False)
    assert not ok and "FAIL: grad norm" in next(line for line in lines if line.startswith("TP=2"))
    again = run_torchrun(2, "scripts/cluster_check.py", "--part=train", "--tensor=1", *common)
    assert again.returncode != 0 and "(fix: paths.runs)" in again.stderr   # torchrun: 1 for a child's 2
    assert str(REPO)  # the scripts ran from the repository
