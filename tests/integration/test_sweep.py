"""make sweep: every point of a grid of distill/logits settings, sharing the run's stages and caches."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import REPO, TINY_RUN

from pipelines.core.artifacts import read_manifest
from pipelines.core.errors import UserError
from pipelines.evaluation import sweep_results
from pipelines.launch import sweep
from pipelines.launch import sweep as sweep_
from pipelines.training.batches import step_samples


def test_sweep_overrides_are_hydras_multirun_syntax():
    fixed, axes = sweep.split(["experiment=demo", "-m", "distill.kd_weight=1,0.5", "logits.k=range(16,80,48)",
                               "distill.lr=1e-3"])
    assert fixed == ["experiment=demo", "distill.lr=1e-3"]
    assert axes == [("distill.kd_weight", ["1", "0.5"]), ("logits.k", ["16", "64"])]
    grid = sweep.points(axes)
    assert [p.name for p in grid] == ["distill.kd_weight=1,logits.k=16", "distill.kd_weight=1,logits.k=64",
                                      "distill.kd_weight=0.5,logits.k=16", "distill.kd_weight=0.5,logits.k=64"]
    assert grid[3].overrides == ["distill.kd_weight=0.5", "logits.k=64"]
    # fixed settings of the swept sections are every point's values, and part of its name
    ce = sweep.points([("distill.data_seed", ["1"])], ["experiment=demo", "distill.teacher=none", "distill.kd_weight=0"])
    other = sweep.points([("distill.data_seed", ["1"])], ["distill.teacher=online"])
    assert ce[0].overrides == ["distill.teacher=none", "distill.kd_weight=0", "distill.data_seed=1"]
    assert ce[0].name.startswith("distill.data_seed=1,fixed-") and ce[0].name != other[0].name


def test_points_share_the_run_and_one_cache_per_setting(tmp_path):
    cfg, fixed, shared, caches, points = sweep_.plan_sweep([
        "experiment=demo", f"paths.runs={tmp_path}", "distill.kd_weight=1,0.5", "logits.k=16,64"])
    assert shared == ["prepare", "import", "correct", "prune"]
    assert sorted(int(one.logits.k) for _, one, _ in caches) == [16, 64]   # two caches for four points
    run = tmp_path / "demo"
    for point, one, _, cache in points:
        assert str(one.run.dir) == str(run / "sweep" / point.name)
        assert str(one.distill.student) == str(run / "prune_depth")          # the run's students
        assert str(one.distill.output) == str(run / "sweep" / point.name / "distill_depth")
        assert str(one.distill.cache) == str(cache) and cache.parent == run / "sweep"
        assert str(one.logits.teacher) == str(run / "import")               # the run's teacher (no correct/ yet)
    by_k = {}
    for _, one, _, cache in points:
        by_k.setdefault(int(one.logits.k), set()).add(cache)
    assert all(len(folders) == 1 for folders in by_k.values()) and by_k[16] != by_k[64]
    # fine-tuning points read no cache
    *_, points = sweep_.plan_sweep(["experiment=demo", f"paths.runs={tmp_path}", "distill.teacher=none",
                                    "distill.kd_weight=0", "distill.lr=1e-3,3e-3"])
    assert [cache for *_, cache in points] == [None, None]


@pytest.mark.parametrize("override, key", [
    ("prune.target_num_layers=1,3", "prune.target_num_layers"),      # the student's architecture
    ("model.hidden_size=32,48", "model.hidden_size"),
    ("correct.lr=1e-3,1e-4", "correct.lr"),                           # the teacher
    ("distill.no_such_key=1,2", "distill.no_such_key"),
    ("distill.output=a,b", "distill.output"),
    ("distill.kd_weight=1,1", "distill.kd_weight"),
    ("distill.kd_weight=1,1.5", "distill.kd_weight"),                 # a point's own check
])
def test_a_bad_sweep_stops_before_any_compute_naming_the_key(override, key, tmp_path):
    with pytest.raises(UserError) as error:
        sweep_.plan_sweep(["experiment=demo", f"paths.runs={tmp_path}", override])
    assert error.value.key == key, error.value
    assert not (tmp_path / "demo").exists()


def test_a_sweep_needs_a_swept_key_and_one_round():
    with pytest.raises(UserError, match="at least one swept key"):
        sweep_.plan_sweep(["experiment=demo", "distill.kd_weight=0.5"])
    with pytest.raises(UserError, match=r"\(fix: run.rounds\)"):
        sweep_.plan_sweep(["experiment=demo", "distill.kd_weight=1,0.5", "run.rounds=[{prune:{target_num_layers:3}}]"])


def test_on_slurm_each_point_is_a_job_after_the_shared_ones(tmp_path, capsys):
    sweep_.run_sweep(["experiment=demo", "cluster=slurm", "cluster.tasks_per_node=1", "cluster.gpus_per_node=0",
                      f"paths.runs={tmp_path}", "distill.kd_weight=1,0.5"], True)
    out = capsys.readouterr().out
    heads = [line for line in out.splitlines() if line.startswith("# ---- ")]
    cache = next(h.split()[2] for h in heads if "logits-" in h)[:-1]
    assert heads[:5] == ["# ---- prepare: sbatch --parsable <<'EOF'",
                         "# ---- import: sbatch --parsable --dependency=afterok:<prepare job> <<'EOF'",
                         "# ---- correct: sbatch --parsable --dependency=afterok:<import job> <<'EOF'",
                         "# ---- prune: sbatch --parsable --dependency=afterok:<correct job> <<'EOF'",
                         f"# ---- {cache}: sbatch --parsable --dependency=afterok:<prune job> <<'EOF'"]
    assert heads[5:] == [f"# ---- point-0: sbatch --parsable --dependency=afterok:<{cache} job> <<'EOF'",
                         f"# ---- point-1: sbatch --parsable --dependency=afterok:<{cache} job> <<'EOF'",
                         "# ---- report: sbatch --parsable --dependency=afterok:<point-0 job>:<point-1 job> <<'EOF'"]
    point = out.split("# ---- point-1")[1].split("\nEOF")[0]
    assert point.count("scripts/distill.py") == 2 and point.count("scripts/eval.py") == 1   # two students, one eval
    assert "distill.kd_weight=0.5" in point and "--job-name=pd-demo-point-1" in point
    assert f"#SBATCH --output={tmp_path / 'demo' / 'slurm'}/%x-%j.out" in point   # the run's log folder, which exists


def test_seeds_of_a_setting_are_averaged():
    rows = [{"point": f"p{seed}", "values": {"distill.kd_weight": "1", "distill.data_seed": str(seed)},
             "student": "depth", "tokens": 10, "distill_val_loss": loss, "val_loss": loss, "corpus": None,
             "mmlu": None, "curve": []} for seed, loss in ((1, 3.0), (2, 3.2), (3, 3.4))]
    rows.append({**rows[0], "values": {"distill.kd_weight": "0.5", "distill.data_seed": "1"}, "val_loss": 2.0,
                 "distill_val_loss": 2.0})
    table = sweep_results.compare(rows)
    assert [(e["setting"], e["seeds"]) for e in table] == [("distill.kd_weight=0.5", 1), ("distill.kd_weight=1", 3)]
    same = [{**row, "values": {**row["values"], "distill.lr": "1e-3"}} for row in rows]
    assert sweep_results.compare(same)[0]["setting"] == "distill.kd_weight=0.5"   # what every point shares is not shown
    assert [e["setting"] for e in sweep_results.compare(rows[:3])] == ["(the run's)"]   # seeds alone: no key to show
    assert table[1]["val_loss"] == pytest.approx(3.2) and table[1]["val_loss_sd"] == pytest.approx(0.2)
    assert table[0]["val_loss_sd"] is None
    assert table[1]["values"] == {"distill.kd_weight": "1"}   # every value of the setting, its seed aside
    curved = [{**row, "curve": [(0, 5.0), (3, row["val_loss"])] + ([(6, 1.0)] if row["point"] == "p1" else [])}
              for row in rows[:3]]
    assert sweep_results.compare(curved)[0]["curve"] == [(0, 5.0), (3, pytest.approx(3.2))]   # steps every seed has
    assert "| depth | distill.kd_weight=1 | 3 | 10 | 3.2000 ± 0.2000 |" in "\n".join(sweep_results.markdown(table))


def test_a_data_seed_reorders_the_same_samples():
    order = np.random.default_rng(3).permutation(8)
    seen = [i for step in range(2) for rank in range(2) for i in step_samples(step, 4, 100, rank, 2, 10, order)]
    assert sorted(seen) == list(range(10, 18)) and seen != list(range(10, 18))


def stage_py(*arguments):
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "PIPELINES_RUNS")}
    return subprocess.run([sys.executable, "scripts/stage.py", *arguments], cwd=REPO, capture_output=True,
                          text=True, timeout=900, env={**env, "OMP_NUM_THREADS": "2"})


def tiny_run(tiny_teacher, tiny_data) -> list[str]:
    """Overrides of a small run on the tiny fixtures: the teacher fixture's runs folder, where its
    import/ (and the data) are up to date, one depth student, a few steps of everything."""
    runs, data = tiny_teacher.parents[1], tiny_data.parent
    return [*TINY_RUN, f"paths.runs={runs}", f"data.files=[{data / 'corpus.txt'}]", "data.source=text",
            "data.name=tiny", "data.train_tokenizer_vocab=300", f"data.output={tiny_data}", "data.valid_fraction=0.1",
            f"paths.data={data}", "run.students=[depth]", "prune.target_num_layers=2", "prune.calib_samples=16",
            "prune.eval_samples=8", "prune.sequence_length=64", "prune.batch_size=4", "distill.sequence_length=64",
            "distill.train_steps=4", "distill.global_batch_size=4", "distill.micro_batch_size=4",
            "distill.warmup_steps=1", "distill.eval_interval=2", "distill.save_interval=0", "distill.eval_samples=4",
            "logits.samples_per_shard=8", "eval.limit=1", "eval.shots=1", "eval.mmlu.subjects=[astronomy]",
            "eval.val_samples=4", "eval.sequence_length=64", "eval.corpus.questions=20"]


def test_a_sweep_on_the_tiny_model_then_an_overlapping_one_skips_what_is_done(tiny_teacher, tiny_data):
    """Two data seeds on the tiny run: one cache, two points, the report's comparison with their
    deviation; a second sweep sharing one point trains only the other."""
    run = tiny_teacher.parents[1] / "tiny"     # shared with other tests' sweeps: only what this one adds counts
    before = set((run / "sweep").glob("*"))
    common = tiny_run(tiny_teacher, tiny_data)
    first = stage_py("sweep", *common, "-m", "distill.kd_weight=0.5", "distill.data_seed=1,2")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "[import] " + str(run / "import") in first.stdout and "is up to date" in first.stdout
    made = set((run / "sweep").glob("*")) - before
    caches = sorted(p for p in made if p.name.startswith("logits-"))
    assert len(caches) == 1 and read_manifest(caches[0])["samples"] == 16      # one cache for both points
    assert first.stdout.count("scripts/logits.py") == 1
    points = sorted(p.name for p in made if p.name.startswith("distill."))
    assert [p.split(",")[0] for p in points] == ["distill.data_seed=1", "distill.data_seed=2"]
    assert json.loads((run / "sweep" / points[0] / "point.json").read_text())["values"]["distill.kd_weight"] == "0.5"
    losses = {}
    for name in points:
        manifest = read_manifest(run / "sweep" / name / "distill_depth")
        assert manifest["steps"] == 4 and manifest["inputs"]["student"] == "${paths.runs}/tiny/prune_depth"
        assert read_manifest(run / "sweep" / name / "eval" / "distilled_depth")["stage"] == "eval"
        # a finished point keeps its weights, not its optimizer state (keep_final_checkpoint=false)
        assert (run / "sweep" / name / "distill_depth" / "weights").is_dir()
        assert not (run / "sweep" / name / "distill_depth" / "train" / "checkpoints").exists()
        losses[name] = manifest["final"]["val_loss"]
    # the data seed changes the order of the same samples: the two seeds of a setting differ
    assert losses[points[0]] != losses[points[1]]
    assert read_manifest(run / "sweep" / points[0] / "distill_depth")["inputs"]["settings"]["kd_weight"] == 0.5
    report = json.loads((run / "report.json").read_text())
    mine = [e for e in report["sweep"] if e["tokens"] == 4 * 4 * 64]
    assert [e["seeds"] for e in mine] == [2] and mine[0]["val_loss_sd"] > 0, report["sweep"]
    assert "## Sweep: every point" in (run / "report.md").read_text() and (run / "report_sweep.png").exists()

    again = stage_py("sweep", *common, "distill.kd_weight=0.5", "distill.data_seed=2,3")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert again.stdout.count("distill_depth is up to date") == 1       # the point it shares
    assert again.stdout.count("[distill] step 4/4") == 1               # only seed 3 trains
    assert f"[logits] {caches[0]} is up to date" in again.stdout                # the cache is never made twice
