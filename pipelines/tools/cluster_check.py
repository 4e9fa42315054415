"""``make cluster-check CLUSTER=slurm``: the first job on a new cluster, before a long one.

One GPU cannot prove tensor or sequence parallelism, NCCL or a multi-GPU launch; this job does, on
one node of the cluster, in minutes. Its steps (one ``sbatch`` job, ``srun`` per step):

1. ``model``: a random 4-layer student at Llama-3.1-8B's width (hidden 4096, MLP 14336, 32 heads in
   8 groups, vocabulary 128,256), imported as a megatron checkpoint (host memory, one task);
2. ``train --tensor N`` for N = 8, 2, 1 (every GPU of the node; data parallel over the rest):
   :data:`STEPS` CE steps of the same global batch from the same weights, recording each step's
   loss, gradient norm and time, and the peak GPU memory, beside the memory and time plans'
   predictions for that layout; at TP=2 also a checkpoint saved after step 2 and loaded into a
   fresh trainer, whose next steps must repeat the first trainer's exactly;
3. ``compare`` (one task): one table (layout, loss and gradient norm against TP=1, median step
   time and peak memory against the plans, the resume) and a verdict; status 1 on a failure.

Tolerances: losses within :data:`LOSS_RTOL` and gradient norms within :data:`GRAD_RTOL` of
TP=1 (bf16 sums taken in another order), measured time within :data:`TIME_FACTOR`× of the time
plan either way, measured peak memory below the memory plan's prediction × :data:`MEMORY_SLACK`.
On CPU (gloo, the tests) the same code runs on a tiny shape (``--shape demo``), without timing or
memory verdicts.
"""

from __future__ import annotations

import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

from pipelines.core.errors import UserError, require
from pipelines.core.experiment import REPO

STEPS = 5
TENSOR_SIZES = (8, 2, 1)
LOSS_RTOL, GRAD_RTOL = 0.02, 0.05
TIME_FACTOR, MEMORY_SLACK = 1.5, 1.10
SHAPE = {"num_layers": 4, "hidden_size": 4096, "ffn_hidden_size": 14336, "num_attention_heads": 32,
         "num_query_groups": 8, "kv_channels": 128, "vocab_size": 128256, "max_position_embeddings": 8192}
SEQUENCE, GLOBAL_BATCH = 8192, 8


def compose(overrides: list[str]):
    from pipelines.launch.preflight import compose_pipeline

    chosen = any(o.startswith("experiment=") for o in overrides)
    return compose_pipeline(overrides if chosen else ["experiment=demo", *overrides])


def _shape(name: str, cfg) -> dict:
    from omegaconf import OmegaConf

    model = OmegaConf.to_container(cfg.model, resolve=True)
    return model if name == "demo" else {**model, **SHAPE}


def make_model(folder: Path, shape: dict, name: str = "model") -> Path:
    """A random bf16 Llama of ``shape`` in ``folder/<name>_hf``, imported as ``folder/<name>``
    (reused when already there)."""
    from omegaconf import OmegaConf

    from pipelines.hf.random_hf import write_random_hf
    from pipelines.stages import import_

    hf, checkpoint = folder / f"{name}_hf", folder / name
    if not (checkpoint / "manifest.json").exists():
        if not (hf / "config.json").exists():
            write_random_hf(OmegaConf.create({"output": str(hf), "seed": 0, "dtype": "bfloat16", "model": shape}))
        import_.import_hf(OmegaConf.create({"source": str(hf), "output": str(checkpoint),
                                            "make_vocab_size_divisible_by": 128}))
    return checkpoint


def train(folder: Path, results: Path, tensor: int, overrides: list[str], sequence: int, global_batch: int,
          resume: bool = False) -> dict:
    """:data:`STEPS` CE steps at TP=``tensor`` from ``folder/model``; the figures (the main rank writes
    them to ``results/tp<N>.json``, the training state under ``results/tp<N>/``)."""
    import torch

    from pipelines.backend import distributed
    from pipelines.training.plan import Plan
    from pipelines.training.trainer import Trainer

    output = results / f"tp{tensor}"
    cfg = compose([*overrides, f"distill.student={folder / 'model'}", "distill.teacher=none", "distill.kd_weight=0",
                   f"distill.output={output}", f"distill.sequence_length={sequence}", "distill.micro_batch_size=1",
                   f"distill.global_batch_size={global_batch}", "distill.train_steps=100",
                   "distill.warmup_steps=1", f"parallel.tensor={tensor}", "distill.gc_interval=0"])
    layout = distributed.initialize(cfg.parallel)
    gpu = torch.cuda.is_available()
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    plan = Plan(cfg, layout.data_parallel)
    trainer = Trainer(plan, layout)
    steps = []
    for _ in range(STEPS):
        started = time.perf_counter()
        metrics = trainer.train_step()
        if gpu:
            torch.cuda.synchronize()
        steps.append({"loss": metrics["loss"], "grad_norm": metrics["grad_norm"],
                      "seconds": time.perf_counter() - started})
        if resume and trainer.step == 2:
            if layout.is_main:
                trainer.checkpoints.folder.mkdir(parents=True, exist_ok=True)
            torch.distributed.barrier()
            trainer.checkpoints.save()
    result = {"tensor": tensor, "data": layout.data_parallel, "steps": steps,
              "peak_gb": torch.cuda.max_memory_allocated() / 1e9 if gpu else None}
    trainer.batches.close()
    if resume:   # a fresh trainer from the step-2 checkpoint repeats steps 3..STEPS exactly
        del trainer
        again = Trainer(plan, layout)
        require(again.checkpoints.load() and again.step == 2, "the step-2 checkpoint did not load", "cluster-check")
        repeated = [again.train_step()["loss"] for _ in range(STEPS - 2)]
        again.batches.close()
        result["resume"] = {"losses": repeated, "equal": repeated == [s["loss"] for s in steps[2:]]}
    result.update(_plans(cfg, tensor, layout.data_parallel, sequence, global_batch))
    if layout.is_main:
        results.mkdir(parents=True, exist_ok=True)
        (results / f"tp{tensor}.json").write_text(json.dumps(result, indent=2))
    return result


def _plans(cfg, tensor: int, data: int, sequence: int, global_batch: int) -> dict:
    """The memory and time plans' predictions for this layout (``cluster.gpu``: the time plan's GPU)."""
    from pipelines.backend import kernels
    from pipelines.launch import memory_plan, time_plan
    from pipelines.model import checkpoint

    arch, _ = checkpoint.read_architecture(Path(str(cfg.distill.student)))
    microbatches = global_batch // data
    te = kernels.transformer_engine_available()
    memory = memory_plan.training(arch, sequence=sequence, micro_batch=1, microbatches=microbatches, tensor=tensor,
                                  pipeline=1, data=data, element_bytes=2, distributed_optimizer=True, fused=te,
                                  sequence_parallel=tensor > 1 and te, chunk_tokens=int(cfg.distill.chunk_tokens))
    gpu = time_plan.GPUS.get(str(cfg.cluster.get("gpu") or "h100"), time_plan.GPUS["h100"])
    timed = time_plan.training_step(arch, gpu, sequence=sequence, micro_batch=1, microbatches=microbatches,
                                    tensor=tensor, data=data, spec="te" if te else "local")
    return {"predicted_gb": memory.total / 1e9, "predicted_seconds": timed.seconds, "gpu": gpu.name}


def compare(folder: Path, timed: bool) -> tuple[list[str], bool]:
    """The table and the verdict from ``folder/tp*.json``; ``timed``: judge time and memory too (GPU)."""
    results = {int(p.stem[2:]): json.loads(p.read_text()) for p in sorted(folder.glob("tp*.json"))}
    require(1 in results, f"no TP=1 result in {folder} (the reference)", "cluster-check")
    reference = results[1]["steps"]
    lines = [f"{'layout':<12} {'max loss diff':>13} {'max grad diff':>13} {'step s':>8} {'plan s':>8} "
             f"{'peak GB':>8} {'plan GB':>8} {'resume':>7}  verdict"]
    ok_all = True
    for tensor in sorted(results, reverse=True):
        r = results[tensor]
        loss = max(abs(a["loss"] - b["loss"]) / abs(b["loss"]) for a, b in zip(r["steps"], reference))
        grad = max(abs(a["grad_norm"] - b["grad_norm"]) / max(abs(b["grad_norm"]), 1e-12)
                   for a, b in zip(r["steps"], reference))
        seconds = statistics.median(s["seconds"] for s in r["steps"][1:])
        problems = []
        if loss > LOSS_RTOL:
            problems.append(f"loss {loss:.1%} off TP=1")
        if grad > GRAD_RTOL:
            problems.append(f"grad norm {grad:.1%} off TP=1")
        if "resume" in r and not r["resume"]["equal"]:
            problems.append("the resumed steps differ")
        if timed:
            if not 1 / TIME_FACTOR <= seconds / r["predicted_seconds"] <= TIME_FACTOR:
                problems.append(f"step time {seconds / r['predicted_seconds']:.2f}x the time plan")
            if r["peak_gb"] is not None and r["peak_gb"] > r["predicted_gb"] * MEMORY_SLACK:
                problems.append(f"peak {r['peak_gb'] / r['predicted_gb']:.2f}x the memory plan")
        ok_all &= not problems
        peak = "-" if r["peak_gb"] is None else f"{r['peak_gb']:.1f}"
        resume = "-" if "resume" not in r else ("equal" if r["resume"]["equal"] else "DIFFERS")
        lines.append(f"TP={tensor} DP={r['data']:<4} {loss:13.2%} {grad:13.2%} {seconds:8.3f} "
                     f"{r['predicted_seconds']:8.3f} {peak:>8} {r['predicted_gb']:8.1f} {resume:>7}  "
                     + ("ok" if not problems else "FAIL: " + "; ".join(problems)))
    lines.append(("PASS" if ok_all else "FAIL") + f": {len(results)} layouts, {STEPS} steps each"
                 + ("" if timed else " (no GPU: time and memory not judged)"))
    return lines, ok_all


def batch_script(cfg, overrides: list[str], shape: str = "8b") -> str:
    """The one job: the model, the three layouts, the comparison (``cluster=slurm``)."""
    from pipelines.launch.plan import python_executable
    from pipelines.launch.slurm import cluster_directives, container_flags, directive_path, job_environment

    c = cfg.cluster
    tasks = int(c.gpus_per_node)
    require(tasks >= max(TENSOR_SIZES), f"cluster.gpus_per_node={tasks}: the check runs TP=8 on one node",
            "cluster.gpus_per_node")
    folder = directive_path(Path(str(cfg.paths.runs)).resolve() / "cluster_check")
    python = python_executable(cfg)
    script = "scripts/cluster_check.py"
    common = [f"--shape={shape}", *overrides]
    lines = ["#!/bin/bash", f"#SBATCH --job-name={c.job_prefix}-cluster-check", "#SBATCH --nodes=1",
             f"#SBATCH --ntasks-per-node={tasks}", f"#SBATCH --gpus-per-node={tasks}",
             f"#SBATCH --cpus-per-task={int(c.cpus_per_task)}", "#SBATCH --time=00:30:00",
             f"#SBATCH --output={folder}/cluster-check-%j.out"]
    lines += cluster_directives(c)
    lines += ["", "set -euo pipefail", f"cd {shlex.quote(str(REPO))}",
              "export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false", *job_environment(c)]
    lines += ["export MASTER_PORT=$((20000 + RANDOM % 40000))"]
    container = container_flags(cfg)
    one = ["srun", "--ntasks=1", f"--cpus-per-task={int(c.cpus_per_task)}", *container, python, script]
    every = ["srun", "--kill-on-bad-exit=1", f"--ntasks-per-node={tasks}", f"--cpus-per-task={int(c.cpus_per_task)}",
             *container, python, script]
    lines.append(shlex.join([*one, "--part=model", *common]))
    for tensor in TENSOR_SIZES:
        extra = ["--resume"] if tensor == 2 else []
        lines.append(shlex.join([*every, "--part=train", f"--tensor={tensor}", *extra, *common]))
    lines.append(shlex.join([*one, "--part=compare", *common]))
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
    """``cluster_check.py [--part model|train|compare|submit] [--tensor N] [--resume] [--shape 8b|demo]
    [--dry-run] [key=value ...]``; no ``--part``: submit the job (``cluster=slurm``)."""
    options = {a.split("=", 1)[0]: (a.split("=", 1)[1] if "=" in a else True) for a in argv if a.startswith("--")}
    overrides = [a for a in argv if not a.startswith("--")]
    unknown = set(options) - {"--part", "--tensor", "--resume", "--shape", "--dry-run"}
    require(not unknown, f"unknown options {sorted(unknown)}", "ARGS")
    part, shape = str(options.get("--part", "submit")), str(options.get("--shape", "8b"))
    require(part in ("model", "train", "compare", "submit"), f"--part={part}: model, train, compare or submit",
            "--part")
    require(shape in ("8b", "demo"), f"--shape={shape}: 8b or demo", "--shape")
    cfg = compose(overrides)
    folder = Path(str(cfg.paths.runs)).resolve() / "cluster_check"
    results = folder / f"job-{os.environ.get('SLURM_JOB_ID', 'local')}"   # this job's layouts and verdict
    sequence, batch = (SEQUENCE, GLOBAL_BATCH) if shape == "8b" else (int(cfg.distill.sequence_length), 8)
    if part == "submit":
        require(str(cfg.cluster.kind) == "slurm", "make cluster-check submits one job to the cluster: "
                "CLUSTER=slurm", "CLUSTER")
        script = batch_script(cfg, overrides, shape)
        if "--dry-run" in options:
            print(script, end="")
            return
        import shutil
        import subprocess

        require(shutil.which("sbatch") is not None, "no sbatch on this machine: run make cluster-check "
                "on the cluster's login node (DRY_RUN=1 prints the job here)", "CLUSTER")
        folder.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["sbatch", "--parsable"], input=script, capture_output=True, text=True)
        if done.returncode:
            why = [line for line in done.stderr.splitlines() if line.strip()] or [f"exit {done.returncode}"]
            raise UserError(f"sbatch refused the cluster-check job: {why[-1].strip()}", "cluster")
        print(f"[cluster-check] job {done.stdout.strip()}; its table and verdict in {folder}/cluster-check-"
              f"{done.stdout.strip()}.out", flush=True)
    elif part == "model":
        folder.mkdir(parents=True, exist_ok=True)
        print(f"[cluster-check] model: {make_model(folder, _shape(shape, cfg))}", flush=True)
    elif part == "train":
        tensor = int(options.get("--tensor", 1))
        require(not (results / f"tp{tensor}.json").exists(), f"{results / f'tp{tensor}.json'} exists: an earlier check's; "
                "remove it, or run in another paths.runs", "paths.runs")
        result = train(folder, results, tensor, overrides, sequence, batch, resume="--resume" in options)
        print(f"[cluster-check] TP={tensor}: losses {[round(s['loss'], 4) for s in result['steps']]}", flush=True)
    else:
        import torch

        lines, ok = compare(results, timed=torch.cuda.is_available())
        for line in lines:
            print(f"[cluster-check] {line}", flush=True)
        (results / "verdict.txt").write_text("\n".join(lines) + "\n")
        if not ok:
            sys.exit(1)
