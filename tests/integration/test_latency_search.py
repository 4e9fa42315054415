"""prune=search by a latency target, ranked by a short distillation from the run's one logits cache
(pipelines/stages/candidates.py, pipelines/pruning/targets.py)."""

import json
from pathlib import Path

import pytest
from helpers import compose
from omegaconf import OmegaConf
from test_prune import COMMON

from pipelines import stages
from pipelines.core.artifacts import read_manifest
from pipelines.model import checkpoint
from pipelines.pruning import targets

SEQ = 32
# a coarse grid (11 shapes), each timed whole: tiny models' timings are mostly Python overhead and
# noise, so the part model is checked by tests/unit/test_latency_targets.py and bench/latency_search.py
LATENCY = ["prune.latency.context=32", "prune.latency.decode_tokens=16", "prune.latency.repeats=3",
           "prune.latency.whole_limit=64", "prune.search.hidden_size_divisor=16",
           "prune.search.ffn_hidden_size_divisor=32"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory, trained_teacher, tiny_data):
    folder = tmp_path_factory.mktemp("cache") / "logits"
    stages.run("logits", compose("pipeline", [
        f"logits.teacher={trained_teacher}", f"logits.output={folder}", f"data.output={tiny_data}",
        "logits.mode=sampled", "logits.k=16", "logits.samples=48", "logits.samples_per_shard=16",
        f"logits.sequence_length={SEQ}", "logits.batch_size=8"]))
    return folder


def ranked_cfg(teacher, data, cache, output, *overrides):
    return compose("pipeline", [
        "prune=search", f"prune.source={teacher}", f"prune.output={output}", f"data.output={data}", *COMMON,
        "prune.target_params=null", "prune.search.max_depth_pruning=0.5", "prune.search.top_k=3", *LATENCY,
        f"distill.cache={cache}", f"distill.sequence_length={SEQ}", "distill.micro_batch_size=4",
        "distill.global_batch_size=8", "distill.lr=3e-3", "distill.min_lr=3e-4", "distill.warmup_steps=1",
        "distill.eval_samples=8", "distill.kd_weight=0.7", *overrides])


@pytest.fixture(scope="module")
def searched(tmp_path_factory, trained_teacher, tiny_data, cache):
    """Time the grid once (no target binds), then search under a target only a third of it meets."""
    folder = tmp_path_factory.mktemp("latency")
    open_cfg = ranked_cfg(trained_teacher, tiny_data, cache, folder / "all", "prune.target_latency=1000000",
                          f"prune.candidates={folder / 'candidates'}")
    stages.run("prune", open_cfg)
    timed = json.loads((folder / "candidates" / "latency.json").read_text())
    ordered = sorted(timed["ms"].values())
    target = ordered[len(ordered) // 3]
    cfg = ranked_cfg(trained_teacher, tiny_data, cache, folder / "student", f"prune.target_latency={target}",
                     "prune.search.distill_steps=4", f"prune.candidates={folder / 'candidates'}")
    manifest = stages.run("prune", cfg)
    return folder, cfg, manifest, target, timed


def test_the_chosen_shape_meets_the_latency_target(searched, cpu_runtime):
    folder, cfg, manifest, target, timed = searched
    report = manifest["report"]
    assert report["latency"]["method"] == "whole" and len(timed["ms"]) > 3
    assert all(row["latency_ms"] <= target for row in report["candidates"])
    shapes_over = [ms for ms in timed["ms"].values() if ms > target]
    assert shapes_over   # the target binds: most of the grid is slower
    # timed again, whole, the chosen student is within the target (with the part model's allowed error)
    again = targets.time_shape(report["config_after"], cfg.prune.latency, cpu_runtime)
    assert again <= 1.5 * target
    assert again < max(timed["ms"].values())


def test_the_chosen_candidate_is_the_lowest_after_its_short_distillation(searched):
    folder, cfg, manifest, _, _ = searched
    rows = manifest["report"]["candidates"]
    assert len(rows) == 3 and manifest["report"]["ranked_by"] == "val_loss_distilled"
    chosen = [row for row in rows if row["chosen"]]
    assert len(chosen) == 1 and chosen[0]["val_loss_distilled"] == min(r["val_loss_distilled"] for r in rows)
    # the stage's output is that candidate's pruned checkpoint (not its short-distilled one)
    out = checkpoint.read_architecture(folder / "student")[0]
    assert out == checkpoint.read_architecture(chosen[0]["pruned"])[0]
    def files(root):
        root = Path(root)
        return {str(p.relative_to(root)): p.read_bytes() for p in (root / "weights").rglob("*") if p.is_file()}

    assert files(folder / "student") == files(chosen[0]["pruned"])


def test_the_ranking_runs_read_the_cache_and_no_teacher(searched, cache):
    folder, cfg, manifest, _, _ = searched
    written_at = read_manifest(cache)["written_at"]
    for row in manifest["report"]["candidates"]:
        distilled = read_manifest(folder / "candidates" / row["name"] / "distill")
        assert distilled["teacher"] == "cache" and distilled["steps"] == 4
        assert distilled["inputs"]["cache"] == written_at
        assert distilled["inputs"]["teacher_checkpoint"] is None if "teacher_checkpoint" in distilled["inputs"] else True


def test_the_candidate_runs_skip_like_every_stage(searched, capsys):
    """The stage's output moved away, a rerun redoes no candidate: each is up to date in its folder."""
    folder, cfg, manifest, _, _ = searched
    (folder / "student").rename(folder / "student_before")
    capsys.readouterr()
    again = stages.run("prune", cfg)
    out = capsys.readouterr().out
    assert out.count("is up to date; skipping") == 2 * len(manifest["report"]["candidates"])
    assert again["report"]["candidates"] == manifest["report"]["candidates"]


def test_a_foreign_candidates_folder_is_refused(tmp_path, trained_teacher, tiny_data, cache):
    from pipelines.core.errors import UserError

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    cfg = ranked_cfg(trained_teacher, tiny_data, cache, tmp_path / "out", "prune.target_latency=1000000",
                     f"prune.candidates={tmp_path / 'mine'}")
    with pytest.raises(UserError, match=r"\(fix: prune.candidates"):
        stages.run("prune", cfg)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_ranking_without_the_cache_stops_naming_the_key(tmp_path, trained_teacher, tiny_data):
    from pipelines.core.errors import UserError

    cfg = ranked_cfg(trained_teacher, tiny_data, tmp_path / "no_cache", tmp_path / "out", "prune.target_params=0.8",
                     "prune.search.distill_steps=2")
    with pytest.raises(UserError, match=r"\(fix: prune.search.distill_steps"):
        stages.run("prune", cfg)
    assert OmegaConf.select(cfg, "prune.candidates")
