"""The tests' fixtures: a tokenized tiny corpus, the tiny teacher (random and trained), a CPU runtime.

Helpers that are not fixtures are in ``tests/helpers/`` (``from helpers import compose, REPO``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import TINY_RUN, WORDS, compose
from omegaconf import OmegaConf


@pytest.fixture
def cpu_runtime():
    """A single-process gloo runtime at TP=PP=1."""
    from pipelines.backend import distributed

    return distributed.initialize(OmegaConf.create({"tensor": 1, "pipeline": 1}))

@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A tokenized synthetic corpus with a trained 300-token byte-level BPE."""
    from pipelines import stages

    folder = tmp_path_factory.mktemp("data")
    generator = torch.Generator().manual_seed(0)
    lines = []
    for _ in range(400):
        picks = torch.randint(0, len(WORDS), (60,), generator=generator).tolist()
        lines.append(" ".join(WORDS[i] for i in picks) + ".")
    (folder / "corpus.txt").write_text("\n\n".join(lines))
    cfg = compose("pipeline", [f"data.files=[{folder / 'corpus.txt'}]", "data.source=text",
                                   "data.name=tiny", "data.train_tokenizer_vocab=300",
                                   f"data.output={folder / 'tokens'}", "data.valid_fraction=0.1",
                                   f"paths.data={folder}"])
    stages.run("prepare", cfg)
    return folder / "tokens"

@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory, tiny_data) -> Path:
    """The demo's model (configs/model/tiny.yaml: 4 layers, hidden 64, GQA), random weights, with
    the tiny corpus's 300-token tokenizer: imported by the import stage as the demo imports its
    teacher (``run.random_teacher``). Its Hugging Face folder is ``<parent>/random_hf``."""
    from pipelines import stages

    runs = tmp_path_factory.mktemp("teacher")
    stages.run("import", compose("pipeline", [*TINY_RUN, f"paths.runs={runs}", f"data.output={tiny_data}"]))
    return runs / "tiny" / "import"

@pytest.fixture(scope="session")
def trained_teacher(tmp_path_factory, tiny_teacher, tiny_data) -> Path:
    """The tiny teacher after 150 steps on the tiny corpus with the project's own loop: the
    correct stage (distill with no teacher), as the demo pre-trains its teacher."""
    from pipelines import stages

    folder = tmp_path_factory.mktemp("trained") / "ckpt"
    stages.run("correct", compose("pipeline", [
        *TINY_RUN, f"data.output={tiny_data}", f"correct.student={tiny_teacher}", f"correct.output={folder}",
        "correct.train_steps=150", "correct.lr=3e-3", "correct.min_lr=3e-4", "correct.warmup_steps=5",
        "correct.sequence_length=64", "correct.global_batch_size=8", "correct.micro_batch_size=8",
        "correct.eval_interval=0", "correct.save_interval=0", "correct.log_interval=50",
        "correct.eval_samples=8"]))
    return folder
