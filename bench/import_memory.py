"""Peak resident memory of `scripts/import.py` against the checkpoint's size.

    .venv/bin/python bench/import_memory.py [--layers 20] [--keep DIR]

Writes a random ~1B-parameter fp32 Llama (sharded safetensors) tensor by tensor, imports it in a
child process, and reports the child's peak RSS over the checkpoint's bytes. Goal: <= 1.3.
Last line: ``peak_rss_ratio=<x>``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]


def write_random_llama(folder: Path, layers: int, hidden=2048, ffn=5632, heads=16, groups=4,
                       vocab=32000, shard_layers=8) -> int:
    """A random Llama folder written a few layers per shard; returns its tensor bytes."""
    head_dim = hidden // heads
    shapes = {}
    for layer in range(layers):
        prefix = f"model.layers.{layer}."
        shapes.update({
            prefix + "input_layernorm.weight": (hidden,),
            prefix + "self_attn.q_proj.weight": (heads * head_dim, hidden),
            prefix + "self_attn.k_proj.weight": (groups * head_dim, hidden),
            prefix + "self_attn.v_proj.weight": (groups * head_dim, hidden),
            prefix + "self_attn.o_proj.weight": (hidden, heads * head_dim),
            prefix + "post_attention_layernorm.weight": (hidden,),
            prefix + "mlp.gate_proj.weight": (ffn, hidden),
            prefix + "mlp.up_proj.weight": (ffn, hidden),
            prefix + "mlp.down_proj.weight": (hidden, ffn),
        })
    shapes.update({"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,),
                   "lm_head.weight": (vocab, hidden)})
    names = list(shapes)
    groups_of_names = [names[i:i + 9 * shard_layers] for i in range(0, len(names), 9 * shard_layers)]
    weight_map, total = {}, 0
    for number, group in enumerate(groups_of_names, start=1):
        file_name = f"model-{number:05d}-of-{len(groups_of_names):05d}.safetensors"
        shard = {name: torch.randn(shapes[name]) * 0.02 for name in group}
        total += sum(t.numel() * 4 for t in shard.values())
        save_file(shard, str(folder / file_name), metadata={"format": "pt"})
        weight_map.update({name: file_name for name in group})
        del shard
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": hidden,
        "intermediate_size": ffn, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": groups, "vocab_size": vocab, "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False,
        "hidden_act": "silu", "torch_dtype": "float32"}))
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=20, help="decoder layers (20 -> ~1.04B params)")
    parser.add_argument("--quick", action="store_true",
                        help="2 layers 512 wide, ~40 MB (CI: that it runs; the ratio is the interpreter's)")
    args = parser.parse_args()
    shape = {}
    if args.quick:
        args.layers = 2
        shape = dict(hidden=512, ffn=1408, heads=8, groups=2, vocab=8000)
    with tempfile.TemporaryDirectory(dir=REPO / "runs" if (REPO / "runs").exists() else None) as tmp:
        source, output = Path(tmp) / "hf", Path(tmp) / "ckpt"
        source.mkdir()
        started = time.perf_counter()
        checkpoint_bytes = write_random_llama(source, args.layers, **shape)
        print(f"random Llama: {checkpoint_bytes / 4 / 1e9:.2f}B parameters, "
              f"{checkpoint_bytes / 2**30:.2f} GiB fp32, written in {time.perf_counter() - started:.0f} s")
        started = time.perf_counter()
        subprocess.run([sys.executable, str(REPO / "scripts/import.py"), f"import.source={source}",
                        f"import.output={output}", f"hydra.run.dir={tmp}/hydra"], check=True, cwd=REPO)
        seconds = time.perf_counter() - started
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # KiB on Linux
        print(f"import: {seconds:.0f} s, peak RSS {peak / 2**30:.2f} GiB, "
              f"checkpoint {checkpoint_bytes / 2**30:.2f} GiB")
        print(f"peak_rss_ratio={peak / checkpoint_bytes:.3f}")


if __name__ == "__main__":
    main()
