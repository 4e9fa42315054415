"""run.rounds: prune in rounds, each round pruning the previous round's distilled student."""

import json
import os
import subprocess
import sys

import pytest
from helpers import REPO, compose

from pipelines.core import experiment
from pipelines.core.artifacts import read_manifest
from pipelines.core.errors import UserError
from pipelines.evaluation.recovery import rounds_of, rounds_table
from pipelines.launch import plan, preflight, slurm
from pipelines.pruning import search
from pipelines.training.batches import step_samples

TWO = "run.rounds=[{prune:{target_params:0.6},distill:{train_steps:30}},{prune:{target_params:0.3}}]"
SEARCH = ["experiment=demo", "prune=search", "run.students=[search]", "prune.search.max_width_pruning=0.75",
          "prune.search.max_depth_pruning=0.5"]


def test_each_round_prunes_the_previous_rounds_student_on_the_samples_after_it():
    cfg = compose("pipeline", [*SEARCH, TWO])
    runs = experiment.student_runs(cfg)
    assert [(r.name, r.round, r.previous) for r in runs] == [("search_r1", 1, None), ("search_r2", 2, "search_r1")]
    first, second = (dict(o.split("=", 1) for o in r.overrides) for r in runs)
    assert "prune.source" not in first and first["distill.sample_offset"] == "0"
    assert first["prune.target_params"] == "0.6" and first["distill.train_steps"] == "30"
    assert second["prune.source"].endswith("runs/demo/distill_search_r1")
    assert second["prune.budget_of"] == "${run.teacher}"       # 30% of the teacher, not of round 1
    assert second["distill.sample_offset"] == str(30 * 16)     # after round 1's 30 steps x 16
    assert "distill.train_steps" not in second                 # the experiment's 200
    assert int(cfg.logits.samples) == 30 * 16 + 200 * 16       # the cache covers both rounds
    # a round's config: its own folders, its budget a fraction of the teacher
    one = preflight.compose_pipeline([*SEARCH, TWO, *runs[1].overrides])
    assert str(one.prune.output).endswith("prune_search_r2") and str(one.distill.output).endswith("distill_search_r2")
    assert str(one.distill.student) == str(one.prune.output)
    assert float(one.prune.target_params) == 0.3 and int(one.distill.sample_offset) == 480


def test_step_samples_start_at_the_offset():
    assert step_samples(0, 4, 100, 0, 1, offset=12) == [12, 13, 14, 15]
    assert step_samples(1, 4, 100, 1, 2, offset=96) == [2, 3]   # rank 1 of 2 at step 1 wraps around


def test_the_pipeline_runs_each_round_after_the_one_before():
    cfg = compose("pipeline", [*SEARCH, TWO])
    assert plan.pipeline_stages(cfg) == ["prepare", "import", "correct", "logits", "prune@1", "distill@1",
                                           "prune@2", "distill@2", "quantize", "eval", "speed",
                                           "report", "export"]
    assert plan.pipeline_stages(compose("pipeline", SEARCH))[3:6] == ["logits", "prune", "distill"]
    scripts = plan.invocations("prune@2", cfg, ["experiment=demo", "prune=search"])
    assert len(scripts) == 1 and "run.student=search_r2" in scripts[0] and "prune=search" in scripts[0]


def test_slurm_chains_round_two_after_round_one(capsys):
    cfg = compose("pipeline", [*SEARCH, TWO, "cluster=slurm"])
    slurm.submit(plan.pipeline_stages(cfg), cfg, [*SEARCH, TWO, "cluster=slurm"], dry_run=True)
    out = capsys.readouterr().out
    assert "# ---- prune@2: sbatch --parsable --dependency=afterok:<distill@1 job>" in out
    assert "--job-name=pd-demo-prune-r2" in out


def test_a_bare_stage_runs_the_rounds_whose_previous_round_is_distilled(tmp_path, capsys):
    cfg = compose("pipeline", [*SEARCH, TWO, f"paths.runs={tmp_path}"])
    assert [s[-1] for s in plan.invocations("prune", cfg, [])] == ["distill.sample_offset=0"]
    assert "search_r2 waits for" in capsys.readouterr().out
    (tmp_path / "demo" / "distill_search_r1").mkdir(parents=True)
    (tmp_path / "demo" / "distill_search_r1" / "manifest.json").write_text("{}")
    assert len(plan.invocations("prune", cfg, [])) == 2
    assert len(plan.invocations("distill", cfg, [])) == 1     # round 2's student is not pruned yet
    assert f"search_r2 waits for {tmp_path / 'demo' / 'prune_search_r2'}: make prune first" in capsys.readouterr().out


@pytest.mark.parametrize("rounds, words", [
    ("[{logits:{k:8}}]", "round 1 sets 'logits'"),
    ("[{prune:{target_params:0.6}},{prune:{source:/elsewhere}}]", "round 2 sets prune.source"),
    ("[{distill:{sample_offset:5}}]", "round 1 sets distill.sample_offset"),
    ("[{prune:{target_params:0.6}},{prune:{no_such_key:1}}]", "student search_r2: bad override"),
    ("[{prune:{target_params:0.3}},{prune:{target_params:0.6}}]", "prune.target_params=0.6"),
])
def test_bad_rounds_stop_before_any_compute_naming_run_rounds(rounds, words, tmp_path):
    overrides = [*SEARCH, f"run.rounds={rounds}", f"paths.runs={tmp_path}"]
    cfg = compose("pipeline", overrides)
    with pytest.raises(UserError) as error:
        preflight.check_students(cfg, ["prune", "distill"], overrides)
    assert words in str(error.value)
    # a round that grows the student is the budget's error; every other is the rounds'
    key = "prune.target_params" if "0.6" in words else "run.rounds"
    assert error.value.key == key, error.value


def test_every_student_is_checked_not_only_the_first(tmp_path):
    """Without rounds too: the demo's second student (width) is checked before the first one runs."""
    overrides = ["experiment=demo", "prune.target.hidden_size=1000", f"paths.runs={tmp_path}"]
    cfg = compose("pipeline", overrides)
    with pytest.raises(UserError, match="target hidden_size=1000") as error:
        preflight.check_students(cfg, ["prune"], overrides)
    assert error.value.key == "prune.target.hidden_size"


def test_the_report_shows_each_round():
    report = {"students": ["depth", "search_r1", "search_r2"], "teacher": {"params": 1000, "val_loss": 3.0},
              "pruned_search_r1": {"params": 600, "val_loss": 4.0}, "distilled_search_r1": {"params": 600, "val_loss": 3.5},
              "pruned_search_r2": {"params": 300, "val_loss": 4.5},
              "distilled_search_r2": {"params": 300, "val_loss": 3.9, "corpus": 0.61}}
    assert rounds_of(report["students"]) == {"search": ["search_r1", "search_r2"]}
    table = rounds_table("search", rounds_of(report["students"])["search"], report)
    assert table[-2:] == ["| 1 | 0.001 M | 60.0% | 4.0000 | 3.5000 | – |",
                          "| 2 | 0.000 M | 30.0% | 4.5000 | 3.9000 | 0.610 |"]
    assert rounds_of(["a_r2", "a_r10"]) == {"a": ["a_r2", "a_r10"]}


def stage_py(runs, *arguments):
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "PIPELINES_RUNS")}
    return subprocess.run([sys.executable, "scripts/stage.py", *arguments], cwd=REPO, capture_output=True,
                          text=True, timeout=900, env={**env, "PIPELINES_RUNS": str(runs), "OMP_NUM_THREADS": "2"})


def test_two_rounds_of_depth_pruning_through_the_launcher(tmp_path, trained_teacher, tiny_data):
    """make prune && make distill, twice: round 1 (4 -> 3 layers), then round 2 prunes round 1's
    distilled student (3 -> 2) and distills it on the samples after round 1's."""
    run = tmp_path / "rounds"
    run.mkdir()
    (run / "import").symlink_to(trained_teacher)   # the run's teacher
    overrides = ["model=tiny", "model.vocab_size=300", "run.name=rounds", f"data.output={tiny_data}",
                 "prune=depth", "run.students=[depth]",
                 "run.rounds=[{prune:{target_num_layers:3}},{prune:{target_num_layers:2}}]",
                 "prune.calib_samples=16", "prune.eval_samples=8", "prune.sequence_length=64", "prune.batch_size=4",
                 "distill.sequence_length=64", "distill.train_steps=3", "distill.global_batch_size=4",
                 "distill.micro_batch_size=4", "distill.warmup_steps=1", "distill.eval_interval=0",
                 "distill.save_interval=0", "distill.eval_samples=4", "logits.samples_per_shard=8"]
    first = stage_py(tmp_path, "prune,logits,distill", *overrides)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "depth_r2 waits for" in first.stdout
    assert read_manifest(run / "distill_depth_r1") and not (run / "prune_depth_r2").exists()
    assert read_manifest(run / "logits")["samples"] == 2 * 3 * 4      # both rounds' samples, cached once
    second = stage_py(tmp_path, "prune,distill", *overrides)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "prune_depth_r1 is up to date" in second.stdout and "distill_depth_r1 is up to date" in second.stdout
    pruned = read_manifest(run / "prune_depth_r2")
    assert pruned["config"]["num_layers"] == 2
    assert pruned["inputs"]["source_path"] == "${run.dir}/distill_depth_r1"     # stamped relative to the run
    distilled = read_manifest(run / "distill_depth_r2")
    assert distilled["inputs"]["settings"]["sample_offset"] == 12 and distilled["steps"] == 3
    assert distilled["inputs"]["student"] == "${run.dir}/prune_depth_r2"
    assert json.loads((run / "prune_depth_r2" / "prune_report.json").read_text())["config_before"]["num_layers"] == 3


def test_a_round_is_refused_only_when_every_candidate_of_the_round_before_fails_it(tmp_path, capsys):
    """At ModelOpt's default limits (40% width, 20% depth) round 2 of 60% -> 30% is out of reach
    from every round-1 candidate: refused. At 32% it is out of reach only from the largest: a warning."""
    def check(second):
        overrides = ["experiment=demo", "prune=search", "run.students=[search]", f"paths.runs={tmp_path}",
                     f"run.rounds=[{{prune:{{target_params:0.6}}}},{{prune:{{target_params:{second}}}}}]"]
        return preflight.check_students(compose("pipeline", overrides), ["prune", "distill"], overrides)

    with pytest.raises(UserError, match=r"^student search_r2 \(round 2, pruning search_r1\): no shape within") as error:
        check(0.3)
    assert error.value.key == "prune.target_params"
    checked = check(0.32)
    assert "[check] search_r2: no shape within" in capsys.readouterr().out
    assert search.counted(checked[1]["student"]) <= int(0.32 * search.model_lib.count_parameters(checked[0]["teacher"]))


