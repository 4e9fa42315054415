"""Decode speed of the SmolLM2-135M experiment's students against their teacher, depth against width.

    .venv/bin/python bench/student_speed.py            # 5 repeats, 32 new tokens, batch 1 and 8
    .venv/bin/python bench/student_speed.py --quick    # 2 repeats, 8 new tokens (CI)

The shapes are the experiment's (``configs/experiment/smollm2_135m.yaml``): the teacher (30 layers,
hidden 576, MLP 1536), the depth student (20 layers) and the width student (hidden 504, MLP 1152, 30
layers), about the same parameter count. Timing needs no trained weights, so each is a random
Hugging Face Llama of its shape; the timing is the speed stage's (:mod:`pipelines.evaluation.speed`):
the same prompt, one process, the models' order alternating, medians. Last line:
``depth_decode_speedup=<x> width_decode_speedup=<y> depth_params_ratio=<p> width_params_ratio=<q>``
(decode tokens/s at batch 1 over the teacher's; parameters over the teacher's).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipelines.backend import distributed  # noqa: E402
from pipelines.evaluation.speed import measure  # noqa: E402
from pipelines.hf import llama_map  # noqa: E402
from pipelines.model import build  # noqa: E402

SHAPES = {"teacher": {}, "depth": {"num_layers": 20},
          "width": {"hidden_size": 504, "ffn_hidden_size": 1152}}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    from transformers import LlamaConfig, LlamaForCausalLM

    base = OmegaConf.to_container(OmegaConf.load(REPO / "configs" / "model" / "smollm2-135m.yaml"))
    torch.manual_seed(0)
    models, params = {}, {}
    for name, change in SHAPES.items():
        arch = build.architecture({**base, **change})
        params[name] = build.count_parameters(arch)
        config = LlamaConfig(**llama_map.hf_config(arch, torch.float32), attn_implementation="sdpa")
        models[name] = LlamaForCausalLM(config).eval()
        print(f"[student_speed] {name}: {arch['num_layers']} layers, hidden {arch['hidden_size']}, MLP "
              f"{arch['ffn_hidden_size']}: {params[name] / 1e6:.1f} M parameters", flush=True)
    settings = OmegaConf.create({"prompt_length": 64 if args.quick else 128, "decode_tokens": 8 if args.quick else 32,
                                 "batch": 8, "repeats": 2 if args.quick else 5})
    host = distributed.Layout(0, 1, 0, 1, 1, 1, 1, torch.device("cpu"))   # one process on this host's CPU
    found = measure(models, settings, host, log=lambda line: print(line, flush=True))
    decode = {n: f["decode_tokens_per_s_batch1"]["median"] for n, f in found.items()}
    for name, figures in found.items():
        spread = figures["decode_tokens_per_s_batch1"]
        print(f"[student_speed] {name}: decode {spread['median']:.1f} tok/s at batch 1 (min {spread['min']:.1f}, "
              f"max {spread['max']:.1f}), batch 8 {figures['decode_tokens_per_s_batch8']['median']:.1f} tok/s, "
              f"prefill {figures['prefill_tokens_per_s']['median']:.0f} tok/s", flush=True)
    print(f"depth_decode_speedup={decode['depth'] / decode['teacher']:.3f} "
          f"width_decode_speedup={decode['width'] / decode['teacher']:.3f} "
          f"depth_params_ratio={params['depth'] / params['teacher']:.3f} "
          f"width_params_ratio={params['width'] / params['teacher']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
