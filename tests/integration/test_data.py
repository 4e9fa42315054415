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
