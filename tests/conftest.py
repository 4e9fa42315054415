"""Shared fixtures: random Hugging Face Llamas, imported checkpoints, and a CPU runtime."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import pipelines  # noqa: F401  (registers the config resolvers)

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 32}


def make_hf_llama(folder: Path, tie: bool = False, rope_scaling=LLAMA3_SCALING, seed: int = 0,
                  vocab_size: int = 300, **overrides) -> Path:
    """Save a random-initialised ``LlamaForCausalLM`` (GQA, Llama-3 RoPE scaling) to ``folder``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    kwargs = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  rms_norm_eps=1e-5, rope_theta=500000.0, rope_scaling=rope_scaling,
                  tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**kwargs))
    # Random init leaves norms at 1; perturb them so the test sees a wrong mapping.
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.add_(0.1 * torch.randn_like(parameter))
    model.save_pretrained(folder)
    return folder


def import_cfg(source: Path, output: Path):
    return OmegaConf.create({"source": str(source), "output": str(output),
                             "make_vocab_size_divisible_by": 128})


def import_hf_llama(folder: Path, tokenizer: Path, **overrides) -> Path:
    """:func:`make_hf_llama` in ``folder / "hf"`` with ``tokenizer``'s files beside it, imported to
    ``folder / "ckpt"`` (returned)."""
    import shutil

    from pipelines.stages import import_

    hf = make_hf_llama(folder / "hf", **overrides)
    for file in tokenizer.iterdir():
        shutil.copy(file, hf / file.name)
    import_.import_hf(import_cfg(hf, folder / "ckpt"))
    return folder / "ckpt"


def export_cfg(source: Path, output: Path):
    return OmegaConf.create({"source": str(source), "output": str(output),
                             "max_shard_bytes": 4 << 30})


def child_env(extra: dict | None = None) -> dict:
    """This environment minus the in-process runtime's rendezvous (a child needs its own port)."""
    env = {key: value for key, value in os.environ.items() if key not in ("MASTER_ADDR", "MASTER_PORT")}
    return {**env, **(extra or {})}


def run_script(*args: str, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a repository script in a fresh interpreter (for CLI behaviour and global shims)."""
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=child_env(env))


def run_torchrun(nproc: int, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Launch ``nproc`` gloo processes with torchrun, as a user would."""
    import socket

    with socket.socket() as sock:  # torchrun's --master-port=0 hangs the rendezvous on gloo
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return run_script("-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
                      f"--master-port={port}", *args, timeout=timeout,
                      env={"OMP_NUM_THREADS": "1"})


@pytest.fixture
def cpu_runtime():
    """A single-process gloo runtime at TP=PP=1."""
    from pipelines.backend import distributed

    return distributed.initialize(OmegaConf.create({"tensor": 1, "pipeline": 1}))


# the demo's model at the tiny corpus's vocabulary (its BPE has 300 tokens)
TINY_RUN = ["model=tiny", "model.vocab_size=300", "run.name=tiny", "run.random_teacher=true"]

WORDS = ("the of and to a in that was her it his she had you with for not be as he at by on "
         "letter sister mother father house morning evening walk dinner ball marriage fortune "
         "friend family garden carriage visit manner temper opinion feeling reason").split()


def compose(config_name: str, overrides: list[str]):
    """A stage config composed with Hydra, as the scripts get it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(str(REPO / "configs"), version_base="1.3"):
        return hydra_compose(config_name, overrides=overrides)


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
