"""The distill stage: train a student on a teacher's soft labels with megatron-core (``scripts/distill.py``; ``correct`` is the same stage on the teacher).

The teacher is the cached soft labels (``distill.teacher=cache``: sampled or top-k), the teacher checkpoint run
online under ``no_grad`` with the student's parallel layout (``online``), or nothing (``none``:
plain LM fine-tuning, used to correct or pre-train a teacher). The loss is
``kd_weight · T²·D(teacher ‖ student) + (1 − kd_weight) · CE`` from :mod:`pipelines.ops.kd_loss`.

Training is megatron-core's: the pipeline schedule from ``get_forward_backward_func``, its
``DistributedDataParallel`` and its optimizer (the distributed optimizer on GPUs), with a cosine
learning rate after a linear warm-up, and gradient clipping.

Output folder::

    weights/ model.yaml tokenizer/ manifest.json   the final student (a normal checkpoint)
    train/checkpoints/                             training checkpoints (pipelines.training.train_checkpoint)
    train/metrics.jsonl, train/tensorboard/        metrics (pipelines.training.metrics_log)

The batches of the next steps are built ahead in a thread (:mod:`pipelines.training.prefetch`).

Data order is a function of the step alone (step ``t`` reads samples ``[o + t·B, o + (t+1)·B)`` of
the train split, ``o`` = ``distill.sample_offset`` (0; later rounds of ``run.rounds`` start after
the earlier rounds' samples), wrapping around; with ``distill.data_seed`` the run reads the same
samples in a seeded order (seeds of a sweep then differ in data order only); data-parallel rank
``r`` takes its ``B/dp`` slice), so a resumed run
reads exactly what an uninterrupted one would. Checkpoints are written to a temporary folder and
renamed, and ``latest`` is switched after, so the last good checkpoint is never overwritten.

The loop's parts live in :mod:`pipelines.training`: the plan (:mod:`~pipelines.training.plan`),
the batches (:mod:`~pipelines.training.batches`) and the trainer (:mod:`~pipelines.training.trainer`).
"""

from __future__ import annotations

import gc
import os
import shutil
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from pipelines.backend import distributed
from pipelines.model import checkpoint
from pipelines.model.build import count_parameters
from pipelines.quantization import qad
from pipelines.quantization.qad import FakeQuantization
from pipelines.stages.base import Resume, Stage
from pipelines.stages.rules import training_rules
from pipelines.training import preemption
from pipelines.training.metrics_log import Logger
from pipelines.training.plan import Plan
from pipelines.training.trainer import Trainer


def _plan(cfg, section: str) -> Plan:
    world = distributed.launch_world_size()
    model_parallel = int(cfg.parallel.tensor) * int(cfg.parallel.pipeline) * int(cfg.parallel.get("context", 1))
    return Plan(cfg, max(1, world // model_parallel), section)


def run(cfg, layout, output: Path, inputs: dict, section: str = "distill") -> dict:
    """Train ``cfg[section]`` (``distill``, or ``correct`` for teacher correction) in ``output``,
    resuming from its latest training checkpoint; returns the manifest's fields."""
    d = cfg[section]
    plan = _plan(cfg, section)
    preemption.install()
    trainer = Trainer(plan, layout, FakeQuantization.from_config(cfg, plan, layout))
    if layout.is_main:
        trainer.checkpoints.folder.mkdir(parents=True, exist_ok=True)
    torch.distributed.barrier()
    train_folder = output / "train"
    resumed = trainer.checkpoints.load()
    if resumed and layout.is_main:
        print(f"[{section}] resuming from step {trainer.step} ({trainer.checkpoints.folder})", flush=True)
    logger = Logger(train_folder, layout.is_main, trainer.step, plan.steps,
                    plan.global_batch * plan.sequence_length, section)
    trainer.prepare_eval()
    if trainer.step == 0:
        first = trainer.evaluate()
        logger.log(0, first, "eval")
        if layout.is_main:
            print(f"[{section}] step 0 {_format(first)}", flush=True)
    metrics, started = {}, time.perf_counter()
    collect = int(d.gc_interval)
    if collect:   # Megatron-LM's manual GC: every rank collects at the same step, none mid-collective
        gc.disable()
    try:
        metrics = _train(trainer, plan, d, layout, logger, section, collect)
    finally:
        if collect:
            gc.enable()
    seconds = time.perf_counter() - started
    if trainer.batches is not None:
        trainer.batches.close()
    final = trainer.evaluate()
    trainer.checkpoints.save()
    _write_final_model(trainer, plan, output, layout)
    fields = {"teacher": plan.teacher_kind, "steps": plan.steps,
              "tokens": plan.steps * plan.global_batch * plan.sequence_length,
              "final": {**{k: v for k, v in metrics.items() if k != "skipped"}, **final},
              "train_seconds_this_run": seconds, "parameters": count_parameters(plan.arch),
              "quantize": trainer.fake_quantization.fmt if trainer.fake_quantization else None}
    if layout.is_main:
        fields["content"] = checkpoint.content_digest(output)
        print(f"[{section}] {output}: {_format(final)}", flush=True)
    return fields


def _train(trainer, plan, d, layout, logger, section: str, collect: int) -> dict:
    """The training loop: steps, validation, checkpoints and preemption; the last step's metrics."""
    eval_interval, save_interval = int(d.eval_interval), int(d.save_interval)
    log_interval = int(d.log_interval)
    metrics = {}
    while trainer.step < plan.steps:
        metrics = trainer.train_step()
        step = trainer.step
        if collect and step % collect == 0:
            gc.collect()
        logger.log(step, metrics)
        if step % log_interval == 0 or step == plan.steps:
            logger.progress(step, metrics)
        if eval_interval and (step % eval_interval == 0 or step == plan.steps):
            result = trainer.evaluate()
            logger.log(step, result, "eval")
            metrics.update(result)
            if layout.is_main:
                print(f"[{section}] step {step} {_format(result)}", flush=True)
        if save_interval and step % save_interval == 0 and step < plan.steps:
            trainer.checkpoints.save()
        if step < plan.steps and preemption.requested():
            if not save_interval or step % save_interval:
                trainer.checkpoints.save()
            if layout.is_main:
                print(f"[{section}] preempted: checkpoint at step {step}; exiting for requeue", flush=True)
            torch.distributed.barrier()
            preemption.leave_for_requeue()
    return metrics


def _format(metrics: dict) -> str:
    return " ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))


def _write_final_model(trainer: Trainer, plan: Plan, output: Path, layout) -> None:
    """The student as a normal checkpoint in ``output`` (weights, model.yaml, tokenizer)."""
    staging = output / ".weights.incomplete"
    if layout.is_main:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    torch.distributed.barrier()
    trainer.sync_parameters()
    model = trainer.model.module
    if trainer.fake_quantization is not None:   # the trained function, without the quantizers
        model = trainer.fake_quantization.plain_model(model, plan.arch, trainer.dtype)
    checkpoint.save_weights(model, staging)
    torch.distributed.barrier()
    if layout.is_main:
        shutil.rmtree(output / "weights", ignore_errors=True)
        os.replace(staging / "weights", output / "weights")
        shutil.rmtree(staging)
        checkpoint.write_architecture(output, plan.arch, trainer.dtype)
        shutil.rmtree(output / "tokenizer", ignore_errors=True)
        if (plan.student / "tokenizer").exists():
            shutil.copytree(plan.student / "tokenizer", output / "tokenizer")
    torch.distributed.barrier()


def _drop_training_state(d, output: Path) -> None:
    """A finished stage's training checkpoints, unless ``keep_final_checkpoint``: its weights,
    metrics and manifest are the result; the optimizer state is only for training on."""
    if not d.keep_final_checkpoint:
        shutil.rmtree(output / "train" / "checkpoints", ignore_errors=True)


def training_stage(section: str) -> Stage:
    """``distill``, or ``correct`` (the same loop on the teacher, no teacher of its own).

    Resumable: the training checkpoints survive a crash or a requeue. An unfinished run stamped
    with other settings stops naming them (resuming would mix them, starting over would throw
    the state away); ``force=true`` starts over with the old folder moved aside, never deleted.
    """
    def checks(cfg, arch, layout) -> None:

        training_rules(cfg, section, layout)
        # before a SLURM submission the job's GPU is not here; the trainer checks the device it got
        qad.check(cfg, section, torch.cuda.is_available() or OmegaConf.select(cfg, "cluster.kind") == "slurm")

    return Stage(name=section, output=lambda cfg: Path(str(cfg[section].output)),
                 inputs=lambda cfg: _plan(cfg, section).inputs,
                 run=lambda cfg, layout, output, inputs: run(cfg, layout, output, inputs, section),
                 checks=checks, runtime=lambda cfg: distributed.initialize(cfg.parallel, seed=int(cfg[section].seed)),
                 resume=Resume(on_change="refuse", stamp="train/inputs.json",
                               finished=lambda cfg, output: _drop_training_state(cfg[section], output)),
                 per_student=section == "distill", distributed=True)


STAGE = training_stage("distill")


