"""The runner never removes what a stage did not write, replaces a result by renames only, and
keeps a second run of a stage out of an output folder another run is writing."""

import json
import os
import subprocess
import sys

import pytest
from helpers import run_script
from omegaconf import OmegaConf

from pipelines.core import artifacts
from pipelines.core.artifacts import lock_path, replaced_folders, staging_path
from pipelines.core.errors import UserError
from pipelines.stages.base import Stage, run


def toy(calls: list, version: str = "v1") -> Stage:
    """A host-only stage writing one file; its inputs are ``cfg.toy.version``."""
    def work(cfg, layout, folder, inputs):
        calls.append(inputs)
        (folder / "result.txt").write_text(f"result {inputs['version']}")
        return {}

    return Stage(name="toy", output=lambda cfg: cfg.toy.output, runtime=None, run=work,
                 inputs=lambda cfg: {"version": str(cfg.toy.version)})


def config(output, version="v1", force=False, **toy_keys) -> OmegaConf:
    return OmegaConf.create({"toy": {"output": str(output), "version": version, **toy_keys}, "force": force})


def snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("force", [False, True])
def test_a_folder_the_stage_did_not_write_is_never_removed(tmp_path, force):
    output = tmp_path / "mine"
    output.mkdir()
    (output / "book.txt").write_text("my only copy")
    (output / "notes").mkdir()
    (output / "notes" / "a.md").write_text("notes")
    before = snapshot(output)
    calls = []
    with pytest.raises(UserError, match=r"did not write \(book.txt, notes\).*force=true included") as error:
        run(toy(calls), config(output, force=force))
    assert error.value.key == "toy.output" and calls == []
    assert snapshot(output) == before and not staging_path(output).exists() and not lock_path(output).exists()


def test_a_file_at_the_output_path_is_never_replaced(tmp_path):
    output = tmp_path / "result"
    output.write_text("a file of mine")
    with pytest.raises(UserError, match="did not write") as error:
        run(toy([]), config(output, force=True))
    assert error.value.key == "toy.output" and output.read_text() == "a file of mine"


def test_an_input_inside_the_output_is_refused_before_compute(tmp_path):
    output = tmp_path / "out"
    calls = []
    run(toy(calls), config(output))
    (output / "corpus.txt").write_text("the input")   # a user's input, put in the stage's own folder
    with pytest.raises(UserError, match=r"toy.files: .*corpus.txt is inside the output folder") as error:
        run(toy(calls), config(output, version="v2", files=[str(output / "corpus.txt")]))
    assert error.value.key == "toy.output" and len(calls) == 1
    assert (output / "corpus.txt").read_text() == "the input" and (output / "result.txt").read_text() == "result v1"


def test_new_inputs_replace_the_result_and_force_keeps_the_old_one_aside(tmp_path, capsys):
    output = tmp_path / "out"
    calls = []
    run(toy(calls), config(output))
    run(toy(calls), config(output, version="v2"))                      # changed inputs: replaced
    assert (output / "result.txt").read_text() == "result v2" and replaced_folders([tmp_path]) == []
    run(toy(calls), config(output, version="v2", force=True))          # force: the old one is kept
    kept = replaced_folders([tmp_path])
    assert len(kept) == 1 and (kept[0] / "result.txt").read_text() == "result v2"
    assert f"the previous result is kept in {kept[0]}" in capsys.readouterr().out
    assert kept[0].name.startswith(".out.replaced-") and len(calls) == 3


def test_a_kill_inside_the_replace_loses_nothing_and_is_finished_next_time(tmp_path, monkeypatch):
    """Killed after the old result went aside and before the new one came in: the next run puts
    the finished new one in place without computing it again (it is not 'up to date' before)."""
    output = tmp_path / "out"
    calls = []
    run(toy(calls), config(output))
    real_replace = os.replace

    def killed_before_the_rename_in(source, target):
        if source == staging_path(output):
            raise KeyboardInterrupt("killed between the renames")
        real_replace(source, target)

    monkeypatch.setattr(artifacts.os, "replace", killed_before_the_rename_in)
    with pytest.raises(KeyboardInterrupt):
        run(toy(calls), config(output, version="v2"))
    monkeypatch.setattr(artifacts.os, "replace", real_replace)
    assert not output.exists()                                             # the window the kill hit
    assert (staging_path(output) / "result.txt").read_text() == "result v2"   # the new result, complete
    aside = [p for p in tmp_path.iterdir() if ".replaced-" in p.name]
    assert len(aside) == 1 and (aside[0] / "result.txt").read_text() == "result v1"   # the old one, complete
    again = run(toy(calls), config(output, version="v2"))
    assert len(calls) == 2 and (output / "result.txt").read_text() == "result v2"    # not computed again
    assert again["inputs"] == {"version": "v2"} and not staging_path(output).exists()


def test_a_second_run_is_refused_while_the_first_holds_the_lock(tmp_path):
    output = tmp_path / "out"
    lock = lock_path(output)
    lock.write_text(json.dumps({"host": os.uname().nodename, "pid": os.getpid(), "slurm_job": "4242",
                                "since": "2026-12-03T12:00:00"}))
    calls = []
    with pytest.raises(UserError, match=rf"being written by another run \(pid {os.getpid()} on .*SLURM job 4242") as e:
        run(toy(calls), config(output))
    assert e.value.key == "toy.output" and calls == [] and lock.exists() and not output.exists()


def test_a_lock_whose_process_is_gone_is_taken_over_and_released(tmp_path):
    output = tmp_path / "out"
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    lock_path(output).write_text(json.dumps({"host": os.uname().nodename, "pid": gone.pid, "since": "earlier"}))
    calls = []
    run(toy(calls), config(output))
    assert len(calls) == 1 and (output / "result.txt").exists() and not lock_path(output).exists()


def test_prepare_never_deletes_a_corpus_inside_its_output_folder(tmp_path):
    """The new user's case: data.name=mycorpus with the corpus in data/mycorpus/."""
    corpus = tmp_path / "data" / "mycorpus" / "book.txt"
    corpus.parent.mkdir(parents=True)
    corpus.write_text("It is a truth universally acknowledged.\n\nThat a single man in possession.\n" * 50)
    before = corpus.read_bytes()
    for force in ("false", "true"):
        result = run_script("scripts/prepare.py", "data.source=text", f"data.files=[{corpus}]", "data.name=mycorpus",
                            f"paths.data={tmp_path / 'data'}", "data.train_tokenizer_vocab=300", f"force={force}")
        assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
        assert "(fix: data.output)" in result.stderr and "Traceback" not in result.stderr
        assert corpus.read_bytes() == before and sorted(p.name for p in corpus.parent.iterdir()) == ["book.txt"]


def test_clean_replaced_removes_only_kept_aside_results(tmp_path):
    runs = tmp_path / "runs"
    (runs / "demo" / ".prune_depth.replaced-20261203-1-1").mkdir(parents=True)
    (runs / "demo" / ".prune_depth.replaced-20261203-1-1" / "manifest.json").write_text("{}")
    (runs / "demo" / ".mine.replaced-notes").mkdir()                    # not one of ours: no manifest
    (runs / "demo" / ".mine.replaced-notes" / "a.txt").write_text("mine")
    result = run_script("scripts/stage.py", "clean-replaced", "experiment=demo", f"paths.runs={runs}",
                        f"paths.data={tmp_path / 'data'}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "1 kept-aside result(s) removed" in result.stdout
    assert not (runs / "demo" / ".prune_depth.replaced-20261203-1-1").exists()
    assert (runs / "demo" / ".mine.replaced-notes" / "a.txt").read_text() == "mine"


def test_token_ids_beyond_the_model_vocabulary_are_refused(tmp_path):
    from pipelines.core.artifacts import write_manifest
    from pipelines.data.corpus import check_tokenized_for

    data, model = tmp_path / "data", tmp_path / "model"
    (model / "tokenizer").mkdir(parents=True)
    (model / "tokenizer" / "tokenizer.json").write_text("{}")
    data.mkdir()
    write_manifest(data, {"stage": "prepare", "max_token_id": 49151,
                          "tokenizer_sha256": artifacts.sha256_file(model / "tokenizer" / "tokenizer.json")})
    with pytest.raises(UserError, match=r"token id 49151, beyond .* vocabulary of 32000.*fix: data.tokenizer"):
        check_tokenized_for(data, model, 32000, "data.tokenizer")
    check_tokenized_for(data, model, 49152, "data.tokenizer")      # fits
    check_tokenized_for(tmp_path / "not_yet", model, 32000, "data.tokenizer")   # before prepare: nothing to check


class _RunsCode:
    """What a malicious score cache could hold: unpickling it runs a command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_score_cache_that_could_run_code_is_refused_unread(tmp_path):
    import torch
    from modelopt.torch.prune.plugins.mcore_minitron import CandidateSubnet

    from pipelines.pruning.search import load_search_state

    good = tmp_path / "scores0.pth"
    torch.save({"layer_scores": {1: 0.5}, "top_k_candidates_per_constraint": {
        100.0: [CandidateSubnet({"hidden_size": 64}, 99.0, 3.5)]}}, good)
    state = load_search_state(good)
    assert state["top_k_candidates_per_constraint"][100.0][0].ss_config == {"hidden_size": 64}
    marker = tmp_path / "ran"
    bad = tmp_path / "bad" / "scores0.pth"
    bad.parent.mkdir()
    torch.save({"layer_scores": _RunsCode(marker)}, bad)
    with pytest.raises(UserError, match=r"holds more than scores.*fix: prune.scores_cache"):
        load_search_state(bad)
    assert not marker.exists()


def test_a_torn_last_metrics_line_does_not_stop_a_resume(tmp_path):
    from pipelines.training.metrics_log import Logger

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 4, "loss": 1.0}\n{"step": 5, "loss": 0.9}\n{"step": 6, "loss": 0.8}\n{"step": 7, "lo')
    Logger(tmp_path, True, resume_step=5, total_steps=10, tokens_per_step=1, tag="distill")
    assert metrics.read_text() == '{"step": 4, "loss": 1.0}\n{"step": 5, "loss": 0.9}\n'


def test_training_checkpoints_are_kept_in_step_order_past_six_digits(tmp_path):
    from pipelines.training.train_checkpoint import _step

    names = ["step-999999", "step-1000000", "step-000200"]
    assert [p.name for p in sorted((tmp_path / n for n in names), key=_step)] == \
        ["step-000200", "step-999999", "step-1000000"]


def test_exported_weights_get_the_usual_file_mode(tmp_path):
    import torch

    from pipelines.hf.safetensors_stream import write_sharded

    mask = os.umask(0o022)
    try:
        write_sharded(iter([("w", torch.zeros(4))]), tmp_path)
    finally:
        os.umask(mask)
    assert (tmp_path / "model.safetensors").stat().st_mode & 0o777 == 0o644


def test_a_requeued_slurm_job_takes_over_its_own_earlier_lock(tmp_path, monkeypatch):
    """Killed at the time limit on one node and requeued on another, a job finds its own lock (same
    job id, another host): that is its earlier run's, not a second run's."""
    output = tmp_path / "out"
    lock_path(output).write_text(json.dumps({"host": "node-a", "pid": 1, "slurm_job": "4242", "since": "earlier"}))
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    calls = []
    run(toy(calls), config(output))
    assert len(calls) == 1 and not lock_path(output).exists()
    lock_path(output).write_text(json.dumps({"host": "node-a", "pid": 1, "slurm_job": "4243", "since": "earlier"}))
    with pytest.raises(UserError, match="being written by another run"):
        run(toy(calls), config(output, version="v2"))


def test_gguf_to_hf_never_replaces_a_folder_of_other_files(tmp_path):
    from pipelines.hf.gguf import gguf_to_hf

    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"GGUF")
    output = tmp_path / "mine"
    output.mkdir()
    (output / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="holds other files") as error:
        gguf_to_hf(OmegaConf.create({"source": str(fake), "output": str(output)}))
    assert error.value.key == "output" and (output / "notes.txt").read_text() == "mine"
