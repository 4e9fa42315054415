"""What the tests share that is not a fixture: paths, configs, random Hugging Face Llamas, subprocesses.

The fixtures are in ``tests/conftest.py``; the worker scripts that torchrun starts are in
``tests/workers/``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

import pipelines  # noqa: F401  (registers the config resolvers)

REPO = Path(__file__).resolve().parents[2]
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

# the demo's model at the tiny corpus's vocabulary (its BPE has 300 tokens)
TINY_RUN = ["model=tiny", "model.vocab_size=300", "run.name=tiny", "run.random_teacher=true"]

WORDS = ("the of and to a in that was her it his she had you with for not be as he at by on "
         "letter sister mother father house morning evening walk dinner ball marriage fortune "
         "friend family garden carriage visit manner temper opinion feeling reason").split()

def train_losses(folder: Path, key: str = "loss") -> list[float]:
    """A training run's ``key`` at each logged step (``train/metrics.jsonl``)."""
    import json

    lines = [json.loads(x) for x in (Path(folder) / "train" / "metrics.jsonl").read_text().splitlines()]
    return [x[key] for x in lines if x["kind"] == "train"]


def compose(config_name: str, overrides: list[str]):
    """A stage config composed with Hydra, as the scripts get it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(str(REPO / "configs"), version_base="1.3"):
        return hydra_compose(config_name, overrides=overrides)
