"""Teacher-logits cache: bytes per token, time overhead over the teacher's forward, fidelity.

    .venv/bin/python bench/logits_cache.py [--teacher runs/demo/correct] [--data data/austen]

Needs a teacher checkpoint and tokenized data (``make demo`` makes both; its teacher is the
pre-trained ``runs/demo/correct``). ``--train-steps`` trains the teacher further first (plain
torch AdamW), e.g. for a random one. Overhead: the same samples through (a) the teacher
forward alone and (b) forward + top-k + encoding + writing shards; medians of ``--repeats``.
Last line: ``bytes_per_token=<x> overhead=<x>`` for k = 64.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from pipelines.backend import distributed
from pipelines.data.corpus import TokenWindows
from pipelines.data.logits_cache import Layout, write_shard
from pipelines.launch.cli import quiet_known_noise
from pipelines.model import checkpoint
from pipelines.model.build import forward_logits
from pipelines.ops.kd_loss import teacher_topk


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="runs/demo/correct")
    parser.add_argument("--data", default="data/austen")
    parser.add_argument("--sequence-length", type=int, default=256)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--train-steps", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="16 samples, one repeat (CI)")
    args = parser.parse_args()
    if args.quick:
        args.samples, args.repeats = 16, 1
    quiet_known_noise()
    layout = distributed.initialize(OmegaConf.create({"tensor": 1, "pipeline": 1}))
    model, arch = checkpoint.load_model(Path(args.teacher), layout)
    vocab = arch["vocab_size"]
    train = TokenWindows(Path(args.data), "train", args.sequence_length)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(args.train_steps):
        batch = torch.stack([train[(step * 8 + j) % len(train)] for j in range(8)])
        loss = F.cross_entropy(forward_logits(model, batch[:, :-1])[..., :vocab].flatten(0, 1),
                               batch[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    if args.train_steps:
        print(f"teacher trained {args.train_steps} more steps: train loss {loss.item():.3f}")
    batches = list(TokenWindows(Path(args.data), "valid", args.sequence_length)
                   .batches(args.batch_size, args.samples))
    tokens = sum(b[:, :-1].numel() for b in batches)

    print(f"{'k':>5} {'captured mass':>14} {'KL(full || cached)':>19} {'bytes/token':>12}")
    with torch.no_grad():
        logits = torch.cat([forward_logits(model, b[:, :-1])[..., :vocab] for b in batches])
    log_p = torch.log_softmax(logits.float(), -1)
    for k in (8, 32, 64, 256):
        ids, logprobs, tail = teacher_topk(logits, k)
        stored = logprobs.half().float()
        captured = stored.exp().sum(-1)
        # cached distribution: top-k as stored, the tail mass spread evenly over the other ids
        rest = (1 - captured).clamp_min(1e-12) / (vocab - k)
        cached = torch.full_like(log_p, 0.0) + rest.unsqueeze(-1).log()
        cached.scatter_(-1, ids, stored)
        kl = (log_p.exp() * (log_p - cached)).sum(-1).mean().item()
        layout_k = Layout(args.sequence_length, k, vocab)
        print(f"{k:>5} {captured.mean().item():>14.4f} {kl:>19.5f} "
              f"{layout_k.sample_bytes / args.sequence_length:>12.1f}")

    layout_64 = Layout(args.sequence_length, 64, vocab)
    forward_times, cache_times = [], []
    for _ in range(args.repeats):
        started = time.perf_counter()
        with torch.no_grad():
            for batch in batches:
                forward_logits(model, batch[:, :-1])
        forward_times.append(time.perf_counter() - started)
        with tempfile.TemporaryDirectory() as folder:
            started = time.perf_counter()
            for shard, batch in enumerate(batches):
                with torch.no_grad():
                    out = forward_logits(model, batch[:, :-1])[..., :vocab]
                    ids, logprobs, tail = teacher_topk(out, 64)
                write_shard(Path(folder), shard, [layout_64.encode(ids[j], logprobs[j], tail[j])
                                                  for j in range(len(batch))])
            cache_times.append(time.perf_counter() - started)
    forward, cached = statistics.median(forward_times), statistics.median(cache_times)
    full_bf16 = 128256 * 2
    bytes_per_token = layout_64.sample_bytes / args.sequence_length
    llama_bytes = Layout(1, 64, 128256).sample_bytes
    print(f"forward alone {forward:.2f} s, forward+cache {cached:.2f} s over {tokens} tokens "
          f"(medians of {args.repeats}); vocab {vocab}: {bytes_per_token:.1f} bytes/token; "
          f"at Llama-3's 128,256 vocab: {llama_bytes} bytes/token = "
          f"{100 * llama_bytes / full_bf16:.3f}% of bf16 logits (goal k*4.5+8 = {64 * 4.5 + 8:.0f})")
    print(f"bytes_per_token={bytes_per_token:.1f} overhead={cached / forward:.3f}")


if __name__ == "__main__":
    main()
