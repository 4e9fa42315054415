"""Shared fixtures: random Hugging Face Llamas, imported checkpoints, and a CPU runtime."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

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


def export_cfg(source: Path, output: Path):
    return OmegaConf.create({"source": str(source), "output": str(output),
                             "max_shard_bytes": 4 << 30})


def run_script(*args: str, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a repository script in a fresh interpreter (for CLI behaviour and global shims)."""
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


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
    from pipelines import runtime

    return runtime.initialize(OmegaConf.create({"tensor": 1, "pipeline": 1}))
