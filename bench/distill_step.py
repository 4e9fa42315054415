"""Distillation step cost: KD from the cache and online KD against a CE-only step, time and memory.

    .venv/bin/python bench/distill_step.py [--vocab 32000 --hidden 256 --layers 4 --steps 6]
    .venv/bin/python bench/distill_step.py --real --repeats 3   # SmolLM2-135M's shape (random weights)

Builds (in a temporary folder) a random teacher and a half-depth student of the same shape
family with a Llama-like vocabulary-heavy output layer, caches the teacher's 64 soft labels
(``logits.mode``'s default, sampled) on the demo corpus, then times optimizer steps of the same
student in a fresh process per mode:

- ``ce``: plain LM fine-tuning (``teacher=none``);
- ``cache``: KD from the cached soft labels (``kd_weight=1``);
- ``online``: KD with the teacher run online;
- ``teacher``: the teacher's forward pass alone over the same micro-batches.

Step time is the median over ``--steps`` steps after one warm-up step. With ``--repeats R`` the
four timed workers run R rounds, the order of the modes reversed every other round (this machine
is noisy, and drifts); each ratio is taken within a round and reported as the median over rounds,
with every round's value. Peak memory is the peak
over the steps minus the memory before them (GPU: ``max_memory_allocated``; CPU: resident set,
sampled every millisecond in a second run where glibc returns freed memory at once, so the RSS
follows live tensors; times come from a run with the runtime's default allocator settings).
Last line:
``cache_kd_over_ce_time=<x> online_over_ce_plus_teacher=<x> cache_kd_over_ce_mem=<x>``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def compose(overrides):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import pipelines  # noqa: F401  (resolvers)

    with initialize_config_dir(str(REPO / "configs"), version_base="1.3"):
        return hydra_compose("pipeline", overrides=overrides)


class PeakMemory:
    """Peak memory above the level at start (GPU allocator, or sampled RSS on CPU)."""

    def __enter__(self):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        import psutil

        self.process, self.base = psutil.Process(), psutil.Process().memory_info().rss
        self.peak, self.running = self.base, True

        def sample():
            while self.running:
                self.peak = max(self.peak, self.process.memory_info().rss)
                time.sleep(0.001)

        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            self.extra = torch.cuda.max_memory_allocated() - self.base
        else:
            self.running = False
            self.thread.join()
            self.extra = self.peak - self.base


def worker(mode: str, overrides: list[str], steps: int) -> dict:
    from pipelines.backend import distributed
    from pipelines.launch.cli import quiet_known_noise
    from pipelines.training.plan import Plan
    from pipelines.training.trainer import Trainer

    quiet_known_noise()
    extra = {"ce": ["distill.teacher=none", "distill.kd_weight=0"],
             "cache": ["distill.teacher=cache", "distill.kd_weight=1"],
             "online": ["distill.teacher=online", "distill.kd_weight=1"],
             "teacher": ["distill.teacher=online", "distill.kd_weight=1"]}[mode]
    cfg = compose(overrides + extra)
    layout = distributed.initialize(cfg.parallel)
    trainer = Trainer(Plan(cfg, layout.data_parallel), layout)
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    if mode == "teacher":
        from pipelines.training.batches import make_batch, step_samples

        plan = trainer.plan
        indices = step_samples(0, plan.global_batch, plan.samples, 0, 1)
        batches = [make_batch(plan.windows, None, indices[i:i + plan.micro_batch], layout)["tokens"]
                   for i in range(0, len(indices), plan.micro_batch)]

        def step():
            with torch.no_grad():
                for tokens in batches:
                    trainer.teacher(tokens, *_mask_args(tokens))
    else:
        def step():
            trainer.train_step()
    step()
    times = []
    with PeakMemory() as memory:
        for _ in range(steps):
            sync()
            started = time.perf_counter()
            step()
            sync()
            times.append(time.perf_counter() - started)
    return {"mode": mode, "step_s": statistics.median(times), "peak_extra_bytes": memory.extra,
            "tokens_per_step": trainer.plan.global_batch * trainer.plan.sequence_length}


def _mask_args(tokens):
    from pipelines.model.build import causal_mask, position_ids

    return position_ids(tokens), causal_mask(tokens.shape[1], tokens.device)


def prepare(folder: Path, args) -> list[str]:
    from omegaconf import OmegaConf

    from pipelines import stages
    from pipelines.hf.random_hf import write_random_hf
    from pipelines.stages import import_

    model = OmegaConf.to_container(compose([]).model)
    model.update(vocab_size=args.vocab, hidden_size=args.hidden, ffn_hidden_size=args.hidden * 3,
                 num_attention_heads=args.hidden // 32, num_query_groups=max(1, args.hidden // 64),
                 kv_channels=32, max_position_embeddings=4096)
    if args.real:  # SmolLM2-135M's shape (random weights)
        model.update(vocab_size=49152, hidden_size=576, ffn_hidden_size=1536, num_attention_heads=9,
                     num_query_groups=3, kv_channels=64, rope_scaling=None, tie_word_embeddings=True)
    for name, layers in (("teacher", args.layers), ("student", args.layers // 2)):
        write_random_hf(OmegaConf.create({"output": str(folder / f"{name}_hf"), "seed": 0, "dtype": "float32",
                                          "model": {**model, "num_layers": layers}}))
        import_.import_hf(OmegaConf.create({"source": str(folder / f"{name}_hf"), "output": str(folder / name),
                                            "make_vocab_size_divisible_by": 128}))
    samples = (args.steps + 1) * args.global_batch
    overrides = [f"data.output={args.data}", f"distill.student={folder / 'student'}",
                 f"distill.teacher_checkpoint={folder / 'teacher'}", f"distill.output={folder / 'out'}",
                 f"distill.sequence_length={args.sequence_length}", f"distill.micro_batch_size={args.micro_batch}",
                 f"distill.global_batch_size={args.global_batch}",
                 # exactly the cached samples (distill refuses to read past a cache)
                 f"distill.train_steps={args.steps + 1}", "distill.warmup_steps=0",
                 "distill.chunk_tokens=1024", f"logits.teacher={folder / 'teacher'}",
                 f"logits.output={folder / 'cache'}", f"logits.samples={samples}", "logits.k=64",
                 f"logits.samples_per_shard={samples}"]
    stages.run("logits", compose(overrides))
    return overrides


def _worker(mode: str, overrides: list[str], steps: int, env: dict) -> dict:
    output = subprocess.run([sys.executable, __file__, "--worker", mode, "--overrides", json.dumps(overrides),
                             "--steps", str(steps)], capture_output=True, text=True, cwd=REPO, env=env)
    line = [x for x in output.stdout.splitlines() if x.startswith("RESULT ")]
    if not line:
        raise SystemExit(f"{mode} worker failed:\n{output.stdout[-2000:]}\n{output.stderr[-4000:]}")
    return json.loads(line[0][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/austen")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4, help="teacher layers (the student has half)")
    parser.add_argument("--sequence-length", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=1,
                        help="rounds of the timed workers, in alternating order (ratios: median over rounds)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--overrides", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="vocabulary 8192, 2 timed steps (CI)")
    parser.add_argument("--real", action="store_true",
                        help="SmolLM2-135M's shape: vocabulary 49,152, hidden 576, 30-layer teacher, 15-layer student")
    args = parser.parse_args()
    if args.quick and not args.worker:
        args.vocab, args.steps = 8192, 2
    if args.real:
        args.vocab, args.hidden, args.layers = 49152, 576, 30
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, json.loads(args.overrides), args.steps)))
        return
    modes = ("ce", "cache", "online", "teacher")
    with tempfile.TemporaryDirectory() as temporary:
        overrides = prepare(Path(temporary), args)
        base_env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "MASTER_ADDR")}
        rounds = []
        for round_index in range(args.repeats):
            # time with the runtime's default allocator settings, in alternating order
            order = modes if round_index % 2 == 0 else modes[::-1]
            rounds.append({mode: _worker(mode, overrides, args.steps, base_env) for mode in order})
        # memory with freed memory returned at once, so the sampled RSS follows live tensors (GPU:
        # the timed runs measure both)
        memory = {mode: (rounds[0][mode] if torch.cuda.is_available() else _worker(
            mode, overrides, args.steps, {**base_env, "PIPELINES_KEEP_FREED_MEMORY": "0"}))["peak_extra_bytes"]
            for mode in modes}
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"device: {device}; {'SmolLM2-135M shape, ' if args.real else ''}student {args.layers // 2} layers, "
          f"hidden {args.hidden}, vocab {args.vocab}, "
          f"{args.global_batch}x{args.sequence_length} tokens per step, {args.repeats} round(s)")
    print(f"{'mode':>8} {'step (s)':>9} {'tokens/s':>10} {'peak extra (MiB)':>17}")
    for mode in modes:
        step = statistics.median(r[mode]["step_s"] for r in rounds)
        print(f"{mode:>8} {step:9.3f} {rounds[0][mode]['tokens_per_step'] / step:10,.0f} "
              f"{memory[mode] / 2**20:17.1f}")
    cache_over_ce = [r["cache"]["step_s"] / r["ce"]["step_s"] for r in rounds]
    online = [r["online"]["step_s"] / (r["ce"]["step_s"] + r["teacher"]["step_s"]) for r in rounds]
    if args.repeats > 1:
        print("per round: cache/ce " + " ".join(f"{x:.3f}" for x in cache_over_ce)
              + "; online/(ce+teacher) " + " ".join(f"{x:.3f}" for x in online))
    print(f"cache_kd_over_ce_time={statistics.median(cache_over_ce):.3f} "
          f"online_over_ce_plus_teacher={statistics.median(online):.3f} "
          f"cache_kd_over_ce_mem={memory['cache'] / max(1, memory['ce']):.3f}")


if __name__ == "__main__":
    main()
