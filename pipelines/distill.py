"""The distill stage: train a student on a teacher's soft labels with megatron-core (``scripts/distill.py``).

The teacher is the cached soft labels (``distill.teacher=cache``: sampled or top-k), the teacher checkpoint run
online under ``no_grad`` with the student's parallel layout (``online``), or nothing (``none``:
plain LM fine-tuning, used to correct or pre-train a teacher). The loss is
``kd_weight · T²·D(teacher ‖ student) + (1 − kd_weight) · CE`` from :mod:`pipelines.kd_loss`.

Training is megatron-core's: the pipeline schedule from ``get_forward_backward_func``, its
``DistributedDataParallel`` and its optimizer (the distributed optimizer on GPUs), with a cosine
learning rate after a linear warm-up, and gradient clipping.

Output folder::

    weights/ model.yaml tokenizer/ manifest.json   the final student (a normal checkpoint)
    train/checkpoints/                             training checkpoints (pipelines.train_checkpoint)
    train/metrics.jsonl, train/tensorboard/        metrics (pipelines.metrics_log)

The batches of the next steps are built ahead in a thread (:mod:`pipelines.prefetch`).

Data order is a function of the step alone (step ``t`` reads samples ``[o + t·B, o + (t+1)·B)`` of
the train split, ``o`` = ``distill.sample_offset`` (0; later rounds of ``run.rounds`` start after
the earlier rounds' samples), wrapping around; with ``distill.data_seed`` the run reads the same
samples in a seeded order (seeds of a sweep then differ in data order only); data-parallel rank
``r`` takes its ``B/dp`` slice), so a resumed run
reads exactly what an uninterrupted one would. Checkpoints are written to a temporary folder and
renamed, and ``latest`` is switched after, so the last good checkpoint is never overwritten.
"""

from __future__ import annotations

import os
import shutil
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from pipelines import checkpoint, preemption, runtime
from pipelines.artifacts import read_manifest, sha256_file
from pipelines.data import TokenWindows
from pipelines.errors import require
from pipelines.kd_loss import TopK, distill_loss, teacher_topk
from pipelines.logits_cache import LogitsCache
from pipelines.metrics_log import Logger
from pipelines.model import causal_mask, count_parameters, padded_vocab_size, position_ids
from pipelines.prefetch import StepBatches
from pipelines.stage import Resume, Stage
from pipelines.train_checkpoint import TrainingCheckpoints

# Keys that do not change the trained weights: changing one never restarts or blocks a resume
# (e.g. a smaller chunk_tokens after an out-of-memory error, a save_interval on requeue). The
# cache and output paths are not settings: the cache's content is in the inputs (its manifest).
NOT_RESULT_KEYS = ("output", "cache", "log_interval", "verify_cache", "chunk_tokens", "save_interval",
                   "eval_interval", "eval_samples", "eval_topk", "keep_checkpoints", "keep_final_checkpoint",
                   "recompute")


def tokenizer_hash(folder: Path) -> str | None:
    path = Path(folder) / "tokenizer" / "tokenizer.json"
    return sha256_file(path) if path.exists() else None


# ----------------------------------------------------------------------------- validation


class Plan:
    """What a training stage reads, checked before any compute: paths, sizes, the teacher's
    compatibility; its ``inputs`` decide whether the stage is up to date."""

    def __init__(self, cfg, data_parallel: int, section: str = "distill"):
        d = cfg[section]
        self.section = section
        self.cfg, self.d = cfg, d
        self.student, self.output = Path(str(d.student)), Path(str(d.output))
        require(self.student.is_dir() and read_manifest(self.student) is not None,
                f"student checkpoint {self.student} does not exist or is incomplete", f"{self.section}.student")
        self.arch, self.stored_dtype = checkpoint.read_architecture(self.student)
        self.data = Path(str(cfg.data.output))
        data_inputs = (read_manifest(self.data) or {}).get("inputs")
        self.teacher_kind = str(d.teacher)
        self.kd_weight = float(d.kd_weight)
        self.sequence_length = int(d.sequence_length)
        self.global_batch, self.micro_batch = int(d.global_batch_size), int(d.micro_batch_size)
        # divisible: checks() stops the stage before any compute otherwise
        self.microbatches = max(1, self.global_batch // (self.micro_batch * data_parallel))
        self.steps = int(d.train_steps)
        self.offset = int(d.get("sample_offset") or 0)
        self.renormalize = not bool(d.get("topk_tail", True))
        self.order = None   # position -> sample, within this run's own samples
        if d.get("data_seed") is not None:
            self.order = np.random.default_rng(int(d.data_seed)).permutation(self.steps * self.global_batch)
        self.windows = TokenWindows(self.data, "train", self.sequence_length)
        self.valid = TokenWindows(self.data, "valid", self.sequence_length)
        self.samples = len(self.windows)
        self.teacher_path = Path(str(d.teacher_checkpoint)) if d.get("teacher_checkpoint") else None
        self.cache = None
        if self.teacher_kind == "online":
            if self.teacher_path is None and OmegaConf.select(cfg, "run.teacher"):
                self.teacher_path = Path(str(cfg.run.teacher))   # the run's teacher (corrected when it is)
            require(self.teacher_path is not None, f"{section}.teacher=online needs the teacher checkpoint",
                    f"{self.section}.teacher_checkpoint")
            require(int(cfg.parallel.pipeline) == 1, "the online teacher runs with pipeline parallel "
                    "size 1 (cache the teacher's logits for pipeline-parallel students)", "parallel.pipeline")
        if self.teacher_kind == "cache":
            require(d.get("cache"), f"{section}.teacher=cache needs the teacher-logits folder", f"{self.section}.cache")
            expected = {"data_inputs": data_inputs,
                        "sequence_length": self.sequence_length, "temperature": float(d.temperature),
                        "tokenizer": tokenizer_hash(self.student)}
            self.cache = LogitsCache(Path(str(d.cache)), expected, verify=bool(d.verify_cache))
            reads = min(self.samples, self.offset + self.steps * self.global_batch)  # wraps over the data only
            require(len(self.cache) >= reads, f"the teacher-logits cache {d.cache} holds {len(self.cache)} "
                    f"samples and this run reads up to {reads} (sample_offset + train_steps x global_batch_size, "
                    "at most the data's); raise logits.samples and rerun make logits (finished shards are kept)",
                    "logits.samples")
            if self.teacher_path is None:
                manifest = self.cache.manifest  # caches written before content identities name the path there
                self.teacher_path = Path(manifest.get("teacher_path") or manifest["identity"]["teacher"])
        if self.teacher_path is not None:
            require(self.teacher_path.is_dir(), f"teacher checkpoint {self.teacher_path} does not exist",
                    f"{self.section}.teacher_checkpoint")
            self.teacher_arch, _ = checkpoint.read_architecture(self.teacher_path)
            require(self.teacher_arch["vocab_size"] == self.arch["vocab_size"],
                    f"teacher vocabulary {self.teacher_arch['vocab_size']} != student vocabulary "
                    f"{self.arch['vocab_size']}: distillation needs the same tokenizer",
                    f"{self.section}.teacher_checkpoint")
            ours, theirs = tokenizer_hash(self.student), tokenizer_hash(self.teacher_path)
            require(ours == theirs, f"teacher tokenizer ({self.teacher_path}/tokenizer) differs from the "
                    f"student's ({self.student}/tokenizer)", f"{self.section}.teacher_checkpoint")
        settings = OmegaConf.to_container(d, resolve=True)
        self.inputs = {"student": str(self.student.resolve()),
                       "student_written_at": read_manifest(self.student).get("written_at"),
                       "teacher": str(self.teacher_path.resolve()) if self.teacher_path else None,
                       "cache": self.cache.manifest.get("written_at") if self.cache else None,
                       "data_inputs": data_inputs,
                       "settings": {k: v for k, v in settings.items() if k not in NOT_RESULT_KEYS}}


# ----------------------------------------------------------------------------- data


def step_samples(step: int, global_batch: int, samples: int, dp_rank: int, dp: int, offset: int = 0,
                 order=None) -> list[int]:
    """Sample indices this data-parallel rank trains on at ``step`` (a function of the step alone);
    ``order``: a permutation of the run's positions (``distill.data_seed``)."""
    per_rank = global_batch // dp
    base = step * global_batch + dp_rank * per_rank
    positions = [base + j for j in range(per_rank)]
    if order is not None:
        positions = [int(order[p % len(order)]) for p in positions]
    return [(offset + p) % samples for p in positions]


def host_batch(windows, cache, indices, renormalize: bool = False) -> dict:
    """One micro-batch in host memory: tokens, labels and the cached teacher (or None);
    ``renormalize``: the teacher's top-k renormalised to sum to 1, its tail bucket dropped."""
    rows = torch.stack([windows[i] for i in indices])
    batch = {"tokens": rows[:, :-1], "labels": rows[:, 1:], "teacher": None}
    if cache is not None:
        parts = [cache[i] for i in indices]
        batch["teacher"] = TopK(*(torch.stack(p) for p in zip(*parts)))
        if renormalize:
            batch["teacher"] = renormalized(batch["teacher"])
    return batch


def renormalized(teacher: TopK) -> TopK:
    """The "top-k renormalised" label (``distill.topk_tail=false``): the teacher's mass outside
    its top k is dropped and the rest scaled to 1, so no tail bucket is fitted."""
    logprobs = teacher.logprobs.float()
    logprobs = logprobs - torch.logsumexp(logprobs, dim=-1, keepdim=True)
    return TopK(teacher.ids, logprobs.to(teacher.logprobs.dtype), torch.full_like(teacher.tail, float("-inf")))


def make_batch(windows, cache, indices, layout) -> dict:
    """One micro-batch on ``layout``'s device."""
    return layout.place(host_batch(windows, cache, indices))


# ----------------------------------------------------------------------------- training


def training_dtype(name: str, layout) -> torch.dtype:
    """``distill.dtype`` (checked by :func:`pipelines.validate.training_ranges`): ``auto`` is the
    layout's compute dtype (bf16 on GPU, float32 on CPU); ``bfloat16`` keeps bf16 parameters with
    float32 master weights in the optimizer (also on CPU)."""
    return layout.compute_dtype if name == "auto" else getattr(torch, name)


def training_overrides(layout, recompute: str = "none", trained: bool = True) -> dict:
    """Model-config changes for training (``trained=False``: for a teacher beside it).

    - Sequence parallelism whenever tensor parallelism runs on the TE spec: activations between
      the tensor-parallel regions are split over the sequence instead of replicated ``tp`` times
      (finalize_model_grads then all-reduces the norm gradients). megatron's local spec cannot:
      its torch norm refuses ``sequence_parallel``, so CPU runs (and GPU images without TE) keep
      the activations replicated.
    - Activation recompute (``distill.recompute``, checked by
      :func:`pipelines.validate.training_ranges`): ``full`` keeps only each layer's input and
      recomputes the layer in the backward pass; ``selective`` recomputes the core attention.
    - Gradient-accumulation fusion: each linear layer adds its weight gradient into the DDP
      buffer inside its GEMM (:func:`pipelines.runtime.gradient_accumulation_fusion`, which puts a
      kernel in place where apex's is missing), and the input embedding its token rows'
      (:mod:`pipelines.embedding`, put in place by :func:`pipelines.model.build`), for the trained
      model only: it runs its backward pass inside megatron's DDP, which gives every parameter
      that buffer (a teacher has none).
    """
    overrides = {"sequence_parallel": layout.tensor_parallel > 1 and runtime.transformer_engine_available()}
    if trained:
        runtime.gradient_accumulation_fusion()
        overrides["gradient_accumulation_fusion"] = True
    if recompute == "full":
        overrides.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    elif recompute == "selective":
        overrides.update(recompute_granularity="selective")
    return overrides


class DeviceMetrics:
    """A step's reduced metrics in a device tensor; :meth:`read` brings them to the host (on a GPU,
    waiting for the work queued before it), so a caller reads them once the step is queued."""

    def __init__(self, names: tuple[str, ...], values: torch.Tensor):
        self.names, self.values = names, values

    def read(self) -> dict:
        return dict(zip(self.names, self.values.tolist()))


class Trainer:
    def __init__(self, plan: Plan, layout):
        from megatron.core import parallel_state
        from megatron.core.distributed import (DistributedDataParallel, DistributedDataParallelConfig,
                                               finalize_model_grads)
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        d = plan.d
        self.plan, self.layout, self.d = plan, layout, d
        self.dtype = training_dtype(str(d.dtype), layout)
        overrides = training_overrides(layout, str(d.recompute))
        model, self.arch = checkpoint.load_model(plan.student, layout, dtype=self.dtype, **overrides)
        # megatron's own loop sets this: after the backward passes the schedule reduces gradients
        # over data-parallel ranks, all-reduces tied embedding gradients between the first and last
        # pipeline stages, and norm gradients under sequence parallelism.
        model.config.finalize_model_grads_func = finalize_model_grads
        self.distributed_optimizer = bool(d.distributed_optimizer)
        self.model = DistributedDataParallel(
            config=model.config, module=model,
            ddp_config=DistributedDataParallelConfig(
                grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                use_distributed_optimizer=self.distributed_optimizer))
        runtime.fused_grad_clipping()   # without TE or apex, megatron's clipping loops per tensor (its norm syncs)
        self.optimizer = get_megatron_optimizer(OptimizerConfig(
            optimizer="adam", lr=float(d.lr), min_lr=float(d.min_lr), weight_decay=float(d.weight_decay),
            adam_beta1=float(d.adam_beta1), adam_beta2=float(d.adam_beta2), clip_grad=float(d.clip_grad),
            bf16=self.dtype == torch.bfloat16, params_dtype=self.dtype,
            use_distributed_optimizer=self.distributed_optimizer), [self.model])
        runtime.fused_torch_adam(self.optimizer)   # without TE or apex: torch's Adam, fused
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0, max_lr=float(d.lr), min_lr=float(d.min_lr),
            lr_warmup_steps=int(d.warmup_steps), lr_decay_steps=plan.steps, lr_decay_style="cosine",
            start_wd=float(d.weight_decay), end_wd=float(d.weight_decay), wd_incr_steps=plan.steps,
            wd_incr_style="constant")
        self.teacher = None
        if plan.teacher_kind == "online":
            self.teacher, _ = checkpoint.load_model(plan.teacher_path, layout, dtype=self.dtype,
                                                    **training_overrides(layout, trained=False))
            self.teacher.eval().requires_grad_(False)
        self.tp_group = parallel_state.get_tensor_model_parallel_group()
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_group = parallel_state.get_data_parallel_group()
        self.pp_group = parallel_state.get_pipeline_model_parallel_group()
        self.last_stage = parallel_state.is_pipeline_last_stage()
        self.vocab_size = self.arch["vocab_size"]
        self.padded = padded_vocab_size(self.arch)
        self.teacher_padded = padded_vocab_size(plan.teacher_arch) if self.teacher is not None else None
        # the loss, built once from the config: distill_loss(logits, labels, teacher, kd_weight=...)
        self.loss = partial(distill_loss, temperature=float(d.temperature), divergence=str(d.divergence),
                            beta=float(d.jsd_beta), vocab_size=self.vocab_size, tp_group=self.tp_group,
                            chunk_tokens=int(d.chunk_tokens))
        self.eval_teacher = None
        self.batches = None  # the step batches, built ahead (pipelines.prefetch), from the first step
        self.step = 0
        self.checkpoints = TrainingCheckpoints(self, plan.output / "train" / "checkpoints",
                                               int(d.keep_checkpoints), plan.section)

    # -- the pieces the megatron schedule calls

    def _teacher_logits(self, tokens):
        """The online teacher's logits, sliced like the student's (padding may differ)."""
        from megatron.core import tensor_parallel

        with torch.no_grad():
            logits = self.teacher(tokens, position_ids(tokens), causal_mask(tokens.shape[1], tokens.device))
        if self.teacher_padded == self.padded:
            return logits
        full = tensor_parallel.gather_from_tensor_model_parallel_region(logits.contiguous())
        padded = full.new_full((*full.shape[:-1], self.padded), float("-inf"))
        padded[..., : self.vocab_size] = full[..., : self.vocab_size]
        local = self.padded // self.layout.tensor_parallel
        rank = torch.distributed.get_rank(self.tp_group)
        return padded[..., rank * local:(rank + 1) * local]

    def _loss(self, batch, teacher, kd_weight, output):
        loss, kd, ce = self.loss(output, batch["labels"], teacher, kd_weight=kd_weight)
        return loss, {"loss": loss.detach().clone(), "kd": kd, "ce": ce}

    def _forward_step(self, data_iterator, model, kd_weight=None):
        batch = next(data_iterator)
        tokens = batch["tokens"]
        output = model(tokens, position_ids(tokens), causal_mask(tokens.shape[1], tokens.device))
        teacher = batch["teacher"]
        if teacher is None and self.teacher is not None:
            teacher = self._teacher_logits(tokens)
        weight = self.plan.kd_weight if kd_weight is None else kd_weight
        return output, partial(self._loss, batch, teacher, weight)

    def _reduce(self, losses: list[dict], count: int) -> "DeviceMetrics":
        """Mean of the micro-batch metrics over micro-batches and data-parallel ranks (all ranks),
        on the device: read on the host (one synchronisation) when the step's work is queued."""
        names = ("loss", "kd", "ce")
        if self.last_stage and losses:
            values = torch.stack([torch.stack([m[k] for k in names]) for m in losses]).double().sum(0) / count
        else:
            values = torch.zeros(3, dtype=torch.float64, device=self.layout.device)
        torch.distributed.all_reduce(values, group=self.dp_group)
        values /= self.layout.data_parallel
        torch.distributed.all_reduce(values, group=self.pp_group)
        return DeviceMetrics(names, values)

    def _host_batches(self, step: int) -> list[dict]:
        """The micro-batches of ``step`` for this data-parallel rank, in host memory."""
        plan = self.plan
        indices = step_samples(step, plan.global_batch, plan.samples, self.dp_rank, self.layout.data_parallel,
                               plan.offset, plan.order)
        return [host_batch(plan.windows, plan.cache, indices[i:i + plan.micro_batch], plan.renormalize)
                for i in range(0, len(indices), plan.micro_batch)]

    def forward_backward(self) -> DeviceMetrics:
        """Gradients of the current step's global batch (in the DDP buffers); its metrics, still
        on the device."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        plan = self.plan
        if self.batches is None or self.batches.next_step != self.step:  # first step, or resumed
            if self.batches is not None:
                self.batches.close()
            self.batches = StepBatches(self._host_batches, self.step, plan.steps, self.layout)
        batches = self.batches.get(self.step)
        if not self.model.training:   # after evaluate(); setting it on every module each step costs the
            self.model.train()        # host ~1.5 ms at 20 layers (where a small model's GPU step is host-bound)
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        # the schedule ends with config.finalize_model_grads_func (set in __init__)
        losses = get_forward_backward_func()(
            forward_step_func=self._forward_step, data_iterator=iter(batches), model=[self.model],
            num_microbatches=plan.microbatches, seq_length=plan.sequence_length,
            micro_batch_size=plan.micro_batch, forward_only=False)
        return self._reduce(losses, plan.microbatches)

    def train_step(self) -> dict:
        losses = self.forward_backward()
        lr = self.optimizer.param_groups[0]["lr"]
        ok, grad_norm, _ = self.optimizer.step()
        self.scheduler.step(increment=1)
        self.step += 1
        metrics = losses.read()   # after the optimizer's kernels are queued, not before
        metrics.update(grad_norm=float(grad_norm or 0.0), lr=lr, skipped=not ok,
                       data_wait_s=self.batches.last_wait)
        return metrics

    def prepare_eval(self) -> None:
        """Validation batches, and the teacher's top-k on them when a teacher checkpoint is known."""
        plan, d = self.plan, self.d
        count = min(len(plan.valid), int(d.eval_samples))
        per_rank = count // (self.layout.data_parallel * plan.micro_batch) * plan.micro_batch
        require(per_rank > 0, f"eval_samples={d.eval_samples} gives no validation micro-batch per "
                "data-parallel rank (the valid split may be short)", f"{plan.section}.eval_samples")
        mine = list(range(self.dp_rank * per_rank, (self.dp_rank + 1) * per_rank))
        self.eval_batches = [make_batch(plan.valid, None, mine[i:i + plan.micro_batch], self.layout)
                             for i in range(0, per_rank, plan.micro_batch)]
        if plan.teacher_path is None or int(self.layout.pipeline_parallel) > 1:
            return
        teacher = self.teacher
        if teacher is None:
            teacher, _ = checkpoint.load_model(plan.teacher_path, self.layout, dtype=self.dtype,
                                               **training_overrides(self.layout, trained=False))
        from pipelines.model import local_logits

        teacher.eval()
        with torch.no_grad():
            for batch in self.eval_batches:  # top-k per vocabulary slice, chunked: no full-vocab gather
                batch["teacher"] = teacher_topk(
                    local_logits(teacher, batch["tokens"]), min(self.vocab_size, int(d.eval_topk)),
                    float(d.temperature), vocab_size=self.vocab_size, tp_group=self.tp_group,
                    chunk_tokens=int(d.chunk_tokens))
        del teacher

    def evaluate(self) -> dict:
        """Validation LM loss (``val_loss``) and KL to the teacher (``val_kl``) on fixed tokens."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        has_teacher = self.eval_batches[0]["teacher"] is not None
        self.model.eval()
        with torch.no_grad():
            losses = get_forward_backward_func()(
                forward_step_func=partial(self._forward_step, kd_weight=0.5 if has_teacher else 0.0),
                data_iterator=iter(self.eval_batches), model=[self.model],
                num_microbatches=len(self.eval_batches), seq_length=self.plan.sequence_length,
                micro_batch_size=self.plan.micro_batch, forward_only=True)
        metrics = self._reduce(losses, len(self.eval_batches)).read()
        result = {"val_loss": metrics["ce"]}
        if has_teacher:
            result["val_kl"] = metrics["kd"]
        return result

# ----------------------------------------------------------------------------- the stage


def _plan(cfg, section: str) -> Plan:
    world = runtime.launch_world_size()
    model_parallel = int(cfg.parallel.tensor) * int(cfg.parallel.pipeline) * int(cfg.parallel.get("context", 1))
    return Plan(cfg, max(1, world // model_parallel), section)


def run(cfg, layout, output: Path, inputs: dict, section: str = "distill") -> dict:
    """Train ``cfg[section]`` (``distill``, or ``correct`` for teacher correction) in ``output``,
    resuming from its latest training checkpoint; returns the manifest's fields."""
    d = cfg[section]
    plan = _plan(cfg, section)
    preemption.install()
    trainer = Trainer(plan, layout)
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
    eval_interval, save_interval = int(d.eval_interval), int(d.save_interval)
    log_interval = int(d.log_interval)
    if trainer.step == 0:
        first = trainer.evaluate()
        logger.log(0, first, "eval")
        if layout.is_main:
            print(f"[{section}] step 0 {_format(first)}", flush=True)
    metrics, started = {}, time.perf_counter()
    while trainer.step < plan.steps:
        metrics = trainer.train_step()
        step = trainer.step
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
    seconds = time.perf_counter() - started
    if trainer.batches is not None:
        trainer.batches.close()
    final = trainer.evaluate()
    trainer.checkpoints.save()
    _write_final_model(trainer, plan, output, layout)
    fields = {"teacher": plan.teacher_kind, "steps": plan.steps,
              "tokens": plan.steps * plan.global_batch * plan.sequence_length,
              "final": {**{k: v for k, v in metrics.items() if k != "skipped"}, **final},
              "train_seconds_this_run": seconds, "parameters": count_parameters(plan.arch)}
    if layout.is_main:
        fields["content"] = checkpoint.content_digest(output)
        print(f"[{section}] {output}: {_format(final)}", flush=True)
    return fields


def _format(metrics: dict) -> str:
    return " ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))


def _write_final_model(trainer: Trainer, plan: Plan, output: Path, layout) -> None:
    """The student as a normal checkpoint in ``output`` (weights, model.yaml, tokenizer)."""
    staging = output / ".weights.incomplete"
    if layout.is_main:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    torch.distributed.barrier()
    checkpoint.save_weights(trainer.model.module, staging)
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
        from pipelines.validate import training_rules

        training_rules(cfg, section, layout)

    return Stage(name=section, output=lambda cfg: Path(str(cfg[section].output)),
                 inputs=lambda cfg: _plan(cfg, section).inputs,
                 run=lambda cfg, layout, output, inputs: run(cfg, layout, output, inputs, section),
                 checks=checks, runtime=lambda cfg: runtime.initialize(cfg.parallel, seed=int(cfg[section].seed)),
                 resume=Resume(on_change="refuse", stamp="train/inputs.json",
                               finished=lambda cfg, output: _drop_training_state(cfg[section], output)),
                 per_student=section == "distill", distributed=True)


STAGE = training_stage("distill")
CORRECT = training_stage("correct")
