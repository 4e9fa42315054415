"""Data preparation: indexed datasets, deterministic windows, idempotent reruns, bad input."""

import shutil

import numpy as np
import pytest
from helpers import compose

from pipelines import stages
from pipelines.core.artifacts import read_manifest
from pipelines.core.errors import UserError
from pipelines.data.corpus import TokenWindows


def test_windows_are_deterministic_and_end_documents_with_eos(tiny_data):
    from transformers import AutoTokenizer

    windows = TokenWindows(tiny_data, "train", 64)
    assert len(windows) > 10 and windows[3].shape == (65,)
    assert (windows[3] == TokenWindows(tiny_data, "train", 64)[3]).all()
    eos = AutoTokenizer.from_pretrained(tiny_data / "tokenizer").eos_token_id
    assert int(np.sum(windows.tokens == eos)) > 300  # one per document
    assert len(TokenWindows(tiny_data, "valid", 64)) > 0


def test_rerun_is_skipped_and_force_reruns(tiny_data, tmp_path, capsys):
    args = [f"data.output={tiny_data}", "data.source=text", f"data.files=[{tiny_data.parent / 'corpus.txt'}]",
            "data.name=tiny", "data.train_tokenizer_vocab=300", "data.valid_fraction=0.1",
            f"paths.data={tiny_data.parent}"]
    before = read_manifest(tiny_data)
    assert stages.run("prepare", compose("pipeline", args)) == before
    assert "up to date; skipping" in capsys.readouterr().out
    # force reruns (on a copy: the fixture is shared), into a fresh manifest with the same tokens
    copy = tmp_path / "tokens"
    shutil.copytree(tiny_data, copy)
    forced = stages.run("prepare", compose("pipeline", [*args, f"data.output={copy}", "force=true"]))
    out = capsys.readouterr().out
    assert "up to date" not in out and f"[prepare] {copy}: tokens" in out
    assert forced["tokens"] == read_manifest(copy)["tokens"] == before["tokens"]
    assert (copy / "train.bin").read_bytes() == (tiny_data / "train.bin").read_bytes()


def test_missing_file_names_the_key(tmp_path):
    cfg = compose("pipeline", ["data.source=text", f"data.files=[{tmp_path / 'nope.txt'}]",
                                   f"data.output={tmp_path / 'out'}", f"paths.data={tmp_path}"])
    with pytest.raises(UserError, match="fix: data.files"):
        stages.run("prepare", cfg)


def test_an_edited_corpus_file_reruns_prepare(tmp_path, capsys):
    """Prepare's inputs hold the corpus files' content: an edit (or a truncation) reruns it."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"the letter {i} was her walk and his sister." for i in range(120)))
    args = ["data.source=text", f"data.files=[{corpus}]", "data.name=edited", "data.train_tokenizer_vocab=300",
            f"data.output={tmp_path / 'out'}", f"paths.data={tmp_path}"]
    first = stages.run("prepare", compose("pipeline", args))
    corpus.write_text(corpus.read_text()[: len(corpus.read_text()) // 2])       # truncated by hand
    capsys.readouterr()
    second = stages.run("prepare", compose("pipeline", args))
    assert "up to date" not in capsys.readouterr().out
    assert second["tokens"]["train"] + second["tokens"]["valid"] < first["tokens"]["train"] + first["tokens"]["valid"]


def test_data_of_another_tokenizer_is_refused_before_compute(tiny_data, tiny_teacher, tmp_path):
    """Data tokenized with another BPE of the same size: the teacher would read other tokens."""
    corpus = tmp_path / "other.txt"
    corpus.write_text("\n\n".join(f"zebra quartz {i} jumps over vexed wizards, boxing nymphs." for i in range(200)))
    other = tmp_path / "other_tokens"
    stages.run("prepare", compose("pipeline", ["data.source=text", f"data.files=[{corpus}]", "data.name=other",
                                               "data.train_tokenizer_vocab=300", f"data.output={other}",
                                               f"paths.data={tmp_path}"]))
    assert read_manifest(other)["tokenizer_sha256"] != read_manifest(tiny_data)["tokenizer_sha256"]
    cfg = compose("pipeline", ["model=tiny", "model.vocab_size=300", f"paths.runs={tmp_path / 'runs'}",
                               f"data.output={other}", f"logits.teacher={tiny_teacher}", "logits.samples=4"])
    with pytest.raises(UserError, match=r"tokenized with another tokenizer.*fix: data.tokenizer"):
        stages.run("logits", cfg)
    assert not (tmp_path / "runs" / "default" / "logits" / "manifest.json").exists()


def test_a_hugging_face_data_set_from_a_local_folder(tmp_path, capsys, monkeypatch):
    """data.source=hf reads a folder of data files and a save_to_disk folder to the same tokens; an
    edited file reruns prepare; a missing column, a missing split and an unreachable name are
    refused naming their keys (the Hub itself is not reachable here)."""
    import datasets

    texts = [f"the letter {i} was her walk and his sister." for i in range(120)]
    files = tmp_path / "files"
    files.mkdir()
    (files / "train.jsonl").write_text("".join(f'{{"text": "{t}"}}\n' for t in texts))
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "saved"))
    base = ["data.source=hf", "data.train_tokenizer_vocab=300", f"paths.data={tmp_path}"]
    made = {}
    for name in ("files", "saved"):
        made[name] = stages.run("prepare", compose("pipeline", [*base, f"data.hf_name={tmp_path / name}",
                                                                f"data.output={tmp_path / ('out_' + name)}"]))
    assert made["files"]["tokens"] == made["saved"]["tokens"] and made["files"]["documents"]["train"] > 100
    with (files / "train.jsonl").open("a") as more:
        more.write('{"text": "one more line of her letter."}\n')
    capsys.readouterr()
    stages.run("prepare", compose("pipeline", [*base, f"data.hf_name={files}", f"data.output={tmp_path / 'out_files'}"]))
    assert "up to date" not in capsys.readouterr().out
    cases = [(["data.text_key=body"], r"not 'body'.*\(fix: data.text_key"),
             (["data.hf_split=valid"], r"[Ss]plit.*\(fix: data.hf_split")]
    for extra, refusal in cases:
        with pytest.raises(UserError, match=refusal):
            stages.run("prepare", compose("pipeline", [*base, f"data.hf_name={files}", *extra,
                                                       f"data.output={tmp_path / 'bad'}"]))

    def unreachable(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'someone/corpus' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(UserError, match=r"could not load 'someone/corpus'.*save_to_disk.*\(fix: data.hf_name"):
        stages.run("prepare", compose("pipeline", [*base, "data.hf_name=someone/corpus", f"data.output={tmp_path / 'bad'}"]))
