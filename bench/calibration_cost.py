"""Calibration cost of width pruning against a plain forward pass over the same tokens.

    .venv/bin/python bench/calibration_cost.py [--samples 64] [--sequence-length 256] [--repeats 3]

Builds a random Llama (hidden 512, 8 layers, vocab 8192), then times (a) plain forward passes
over the calibration batches and (b) ModelOpt Minitron's importance estimation on the same
batches (its forward loop with activation hooks, run through ``pipelines.pruning.methods.width_prune``
up to and including the pruning itself). Reports medians over repeats; goal <= 1.3.
Last line: ``calib_over_forward=<x>``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from pipelines.backend import distributed
from pipelines.launch.cli import quiet_known_noise
from pipelines.model import build as model_lib
from pipelines.pruning import methods

ARCH = {"num_layers": 8, "hidden_size": 512, "ffn_hidden_size": 1536, "num_attention_heads": 8,
        "num_query_groups": 4, "kv_channels": 64, "vocab_size": 8192, "max_position_embeddings": 1024,
        "rotary_base": 500000.0, "rope_scaling": None, "norm_eps": 1e-5,
        "tie_word_embeddings": False, "make_vocab_size_divisible_by": 128}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--sequence-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="16 samples of 128 tokens, one repeat (CI)")
    args = parser.parse_args()
    if args.quick:
        args.samples, args.sequence_length, args.repeats = 16, 128, 1
    quiet_known_noise()
    distributed.initialize(OmegaConf.create({"tensor": 1, "pipeline": 1}))
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, ARCH["vocab_size"], (args.batch_size, args.sequence_length + 1),
                             generator=generator) for _ in range(args.samples // args.batch_size)]

    def build():
        torch.manual_seed(0)
        return model_lib.build(ARCH, model_lib.transformer_config(ARCH, torch.float32)).eval()

    forward_times, calibration_times = [], []
    for _ in range(args.repeats):
        model = build()
        started = time.perf_counter()
        with torch.no_grad():
            for batch in batches:
                tokens = batch[:, :-1]
                model(tokens, model_lib.position_ids(tokens), model_lib.causal_mask(tokens.shape[1]))
        forward_times.append(time.perf_counter() - started)
        with tempfile.TemporaryDirectory() as tmp:
            started = time.perf_counter()
            methods.width_prune(model, ARCH, {"hidden_size": 384, "ffn_hidden_size": 1024,
                                            "num_attention_heads": 8},
                              lambda: ((batch[:, :-1], None) for batch in batches), Path(tmp) / "scores.pth")
            calibration_times.append(time.perf_counter() - started)
    forward, calibration = statistics.median(forward_times), statistics.median(calibration_times)
    tokens = args.samples * args.sequence_length
    print(f"plain forward: {forward:.2f} s ({tokens / forward:,.0f} tokens/s); "
          f"calibration + prune: {calibration:.2f} s; medians of {args.repeats}")
    print(f"calib_over_forward={calibration / forward:.3f}")


if __name__ == "__main__":
    main()
