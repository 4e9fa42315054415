"""Random-initialised Hugging Face Llamas of any model config (``scripts/random_hf.py``)."""

from __future__ import annotations

from pathlib import Path

import torch

from pipelines.core.artifacts import staged_folder
from pipelines.core.errors import require
from pipelines.hf import llama_map
from pipelines.model import build as model_lib
from pipelines.model.checkpoint import DTYPES


def write_random_hf(cfg) -> Path:
    """Save ``LlamaForCausalLM`` with the architecture ``cfg.model`` and random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    output = Path(str(cfg.output))
    require(not output.exists(), f"{output} already exists", "output")
    require(str(cfg.dtype) in DTYPES, f"dtype {cfg.dtype} is not one of {sorted(DTYPES)}", "dtype")
    arch = model_lib.architecture(cfg.model)
    model_lib.validate(arch)
    dtype = DTYPES[str(cfg.dtype)]
    torch.manual_seed(int(cfg.seed))
    config = LlamaConfig(**llama_map.hf_config(arch, dtype))
    model = LlamaForCausalLM(config).to(dtype)
    with staged_folder(output) as staging:
        model.save_pretrained(staging)
    print(f"[random_hf] {output}: {model_lib.count_parameters(arch):,} parameters, {cfg.dtype}")
    return output
