"""Data preparation: indexed datasets, deterministic windows, idempotent reruns, bad input."""

import numpy as np
import pytest

from conftest import compose
from pipelines.data import TokenWindows, prepare
from pipelines.errors import UserError


def test_windows_are_deterministic_and_end_documents_with_eos(tiny_data):
    from transformers import AutoTokenizer

    windows = TokenWindows(tiny_data, "train", 64)
    assert len(windows) > 10 and windows[3].shape == (65,)
    assert (windows[3] == TokenWindows(tiny_data, "train", 64)[3]).all()
    eos = AutoTokenizer.from_pretrained(tiny_data / "tokenizer").eos_token_id
    assert int(np.sum(windows.tokens == eos)) > 300  # one per document
    assert len(TokenWindows(tiny_data, "valid", 64)) > 0


def test_rerun_is_skipped(tiny_data, capsys):
    cfg = compose("prepare_data", [f"data.output={tiny_data}", "data.source=text",
                                   f"data.files=[{tiny_data.parent / 'corpus.txt'}]", "data.name=tiny",
                                   "data.train_tokenizer_vocab=300", "data.valid_fraction=0.1",
                                   f"paths.data={tiny_data.parent}"])
    prepare(cfg)
    assert "nothing to do" in capsys.readouterr().out


def test_missing_file_names_the_key(tmp_path):
    cfg = compose("prepare_data", ["data.source=text", f"data.files=[{tmp_path / 'nope.txt'}]",
                                   f"data.output={tmp_path / 'out'}", f"paths.data={tmp_path}"])
    with pytest.raises(UserError, match="fix: data.files"):
        prepare(cfg)
