"""One training step at a time on megatron-core: the model, its DDP, optimizer and schedule.

:class:`Trainer` builds the student (and an online teacher beside it), megatron-core's
``DistributedDataParallel`` and optimizer (the distributed optimizer on GPUs) with a cosine
learning rate after a linear warm-up, and runs ``train_step`` through the pipeline schedule of
``get_forward_backward_func`` with gradient clipping. The loss is
``kd_weight · T²·D(teacher ‖ student) + (1 − kd_weight) · CE`` (:mod:`pipelines.ops.kd_loss`).
The distill stage (:mod:`pipelines.stages.distill`) drives it.
"""

from __future__ import annotations

from functools import partial

import torch

from pipelines.backend import kernels
from pipelines.core.errors import require
from pipelines.model import checkpoint
from pipelines.model.build import local_logits, model_inputs, padded_vocab_size
from pipelines.ops.kd_loss import distill_loss, teacher_topk
from pipelines.training import intermediate
from pipelines.training.batches import host_batch, make_batch, step_samples
from pipelines.training.plan import Plan
from pipelines.training.prefetch import StepBatches
from pipelines.training.train_checkpoint import TrainingCheckpoints

# ----------------------------------------------------------------------------- validation


# ----------------------------------------------------------------------------- data


# ----------------------------------------------------------------------------- training


def gradient_reduce_dtype(section, dtype: torch.dtype) -> torch.dtype:
    """The DDP gradient buffer's and data-parallel reduction's dtype: float32, or with
    ``grad_reduce_dtype=bfloat16`` the bf16 parameters' own (half the buffer and the traffic, the
    sum rounded to bf16)."""
    return dtype if str(section.grad_reduce_dtype) == "bfloat16" else torch.float32


def training_dtype(name: str, layout) -> torch.dtype:
    """``distill.dtype`` (checked by :func:`pipelines.stages.rules.training_ranges`): ``auto`` is the
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
      :func:`pipelines.stages.rules.training_ranges`): ``full`` keeps only each layer's input and
      recomputes the layer in the backward pass; ``selective`` recomputes the core attention.
    - Gradient-accumulation fusion: each linear layer adds its weight gradient into the DDP
      buffer inside its GEMM (:func:`pipelines.backend.kernels.gradient_accumulation_fusion`, which puts a
      kernel in place where apex's is missing), and the input embedding its token rows'
      (:mod:`pipelines.ops.embedding`, put in place by :func:`pipelines.model.build`), for the trained
      model only: it runs its backward pass inside megatron's DDP, which gives every parameter
      that buffer (a teacher has none).
    """
    overrides = {"sequence_parallel": layout.tensor_parallel > 1 and kernels.transformer_engine_available()}
    if trained:
        kernels.gradient_accumulation_fusion()
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
    def __init__(self, plan: Plan, layout, fake_quantization=None):
        """``fake_quantization``: an object whose ``apply(model)`` puts quantizers on the student
        before its DDP and optimizer are built (``distill.quantize``,
        :class:`pipelines.quantization.qad.FakeQuantization`), or None."""
        from megatron.core import parallel_state
        from megatron.core.distributed import (
            DistributedDataParallel,
            DistributedDataParallelConfig,
            finalize_model_grads,
        )
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        d = plan.d
        self.plan, self.layout, self.d = plan, layout, d
        self.dtype = training_dtype(str(d.dtype), layout)
        overrides = training_overrides(layout, str(d.recompute))
        model, self.arch = checkpoint.load_model(plan.student, layout, dtype=self.dtype, **overrides)
        self.fake_quantization = fake_quantization
        if fake_quantization is not None:
            fake_quantization.apply(model)
        # megatron's own loop sets this: after the backward passes the schedule reduces gradients
        # over data-parallel ranks, all-reduces tied embedding gradients between the first and last
        # pipeline stages, and norm gradients under sequence parallelism.
        model.config.finalize_model_grads_func = finalize_model_grads
        self.distributed_optimizer = bool(d.distributed_optimizer)
        overlap = bool(d.overlap_grad_reduce) and layout.data_parallel > 1
        self.model = DistributedDataParallel(
            config=model.config, module=model,
            ddp_config=DistributedDataParallelConfig(
                grad_reduce_in_fp32=gradient_reduce_dtype(d, self.dtype) == torch.float32,
                overlap_grad_reduce=overlap, overlap_param_gather=overlap and self.distributed_optimizer,
                use_distributed_optimizer=self.distributed_optimizer))
        if overlap:   # as Megatron-LM's loop: micro-batches but the last accumulate without a reduction
            model.config.no_sync_func = self.model.no_sync
            model.config.grad_sync_func = self.model.start_grad_sync
        kernels.fused_grad_clipping()   # without TE or apex, megatron's clipping loops per tensor (its norm syncs)
        self.optimizer = get_megatron_optimizer(OptimizerConfig(
            optimizer="adam", lr=float(d.lr), min_lr=float(d.min_lr), weight_decay=float(d.weight_decay),
            adam_beta1=float(d.adam_beta1), adam_beta2=float(d.adam_beta2), clip_grad=float(d.clip_grad),
            bf16=self.dtype == torch.bfloat16, params_dtype=self.dtype,
            use_distributed_optimizer=self.distributed_optimizer), [self.model])
        kernels.fused_torch_adam(self.optimizer)   # without TE or apex: torch's Adam, fused
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
        # distill.intermediate: the chosen layers' outputs of both models, for the hidden-state terms
        self.pairs = plan.intermediate
        self.hidden = self.teacher_hidden = None
        if self.pairs:
            self.hidden = intermediate.HiddenStates(model, [p.student for p in self.pairs])
            self.teacher_hidden = intermediate.HiddenStates(self.teacher, [p.teacher for p in self.pairs])
        self.metric_names = ("loss", "kd", "ce", "hidden") if self.pairs else ("loss", "kd", "ce")
        self.sequence_parallel = bool(model.config.sequence_parallel)
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
        self.batches = None  # the step batches, built ahead (pipelines.training.prefetch), from the first step
        self.step = 0
        self.checkpoints = TrainingCheckpoints(self, plan.output / "train" / "checkpoints",
                                               int(d.keep_checkpoints), plan.section)

    # -- the pieces the megatron schedule calls

    def _teacher_logits(self, tokens, inputs):
        """The online teacher's logits, sliced like the student's (padding may differ); ``inputs``:
        the positions and mask the student read."""
        from megatron.core import tensor_parallel

        with torch.no_grad():
            logits = self.teacher(tokens, *inputs)
        if self.teacher_padded == self.padded:
            return logits
        full = tensor_parallel.gather_from_tensor_model_parallel_region(logits.contiguous())
        padded = full.new_full((*full.shape[:-1], self.padded), float("-inf"))
        padded[..., : self.vocab_size] = full[..., : self.vocab_size]
        local = self.padded // self.layout.tensor_parallel
        rank = torch.distributed.get_rank(self.tp_group)
        return padded[..., rank * local:(rank + 1) * local]

    def _loss(self, batch, teacher, kd_weight, hidden, output):
        loss, kd, ce = self.loss(output, batch["labels"], teacher, kd_weight=kd_weight,
                                 loss_mask=batch.get("loss_mask"), normalizer=batch.get("loss_tokens"))
        metrics = {"loss": None, "kd": kd, "ce": ce}
        if self.pairs:
            metrics["hidden"] = torch.zeros((), device=output.device)
        if hidden is not None:
            loss = loss + hidden
            metrics["hidden"] = hidden.detach().clone()
            if self.sequence_parallel:   # each rank's term covers its tokens: their sum is the term
                torch.distributed.all_reduce(metrics["hidden"], group=self.tp_group)
        metrics["loss"] = loss.detach().clone()
        return loss, metrics

    def _forward_step(self, data_iterator, model, kd_weight=None):
        batch = next(data_iterator)
        tokens = batch["tokens"]
        inputs = model_inputs(tokens, batch.get("starts"))
        output = model(tokens, *inputs)
        teacher = batch["teacher"]
        if teacher is None and self.teacher is not None:
            teacher = self._teacher_logits(tokens, inputs)
        hidden = None
        if self.pairs:   # both forwards ran: the hooks hold this micro-batch's states
            student_states, teacher_states = self.hidden.take(), self.teacher_hidden.take()
            if kd_weight is None:   # training; validation scores the logits (its teacher is cached top-k)
                sp = self.layout.tensor_parallel if self.sequence_parallel else 1
                hidden = intermediate.hidden_loss(
                    self.pairs, student_states, teacher_states, sp, loss_mask=batch.get("loss_mask"),
                    normalizer=batch.get("loss_tokens"),
                    sequence_parallel_rank=torch.distributed.get_rank(self.tp_group) if sp > 1 else 0)
        weight = self.plan.kd_weight if kd_weight is None else kd_weight
        return output, partial(self._loss, batch, teacher, weight, hidden)

    def _reduce(self, losses: list[dict], count: int) -> "DeviceMetrics":
        """Mean of the micro-batch metrics over micro-batches and data-parallel ranks (all ranks),
        on the device: read on the host (one synchronisation) when the step's work is queued."""
        names = self.metric_names
        if self.last_stage and losses:
            values = torch.stack([torch.stack([m[k] for k in names]) for m in losses]).double().sum(0) / count
        else:
            values = torch.zeros(len(names), dtype=torch.float64, device=self.layout.device)
        torch.distributed.all_reduce(values, group=self.dp_group)
        values /= self.layout.data_parallel
        torch.distributed.all_reduce(values, group=self.pp_group)
        return DeviceMetrics(names, values)

    def _host_batches(self, step: int) -> list[dict]:
        """The micro-batches of ``step`` for this data-parallel rank, in host memory."""
        plan = self.plan
        indices = step_samples(step, plan.global_batch, plan.samples, self.dp_rank, self.layout.data_parallel,
                               plan.offset, plan.order)
        batches = [host_batch(plan.windows, plan.cache, indices[i:i + plan.micro_batch], plan.renormalize)
                   for i in range(0, len(indices), plan.micro_batch)]
        if plan.windows.masked:   # every rank's samples of the step: the global batch's counted tokens
            everyone = [i for rank in range(self.layout.data_parallel) for i in step_samples(
                step, plan.global_batch, plan.samples, rank, self.layout.data_parallel, plan.offset, plan.order)]
            share_tokens(batches, self.plan.mask_counts[everyone].sum(), self.layout.data_parallel)
        return batches

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
            self.model.train()        # a walk over every module: only after evaluate() turned it off
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
        if plan.valid.masked:   # the mean over every rank's counted validation tokens
            counted = plan.valid.mask_counts(per_rank * self.layout.data_parallel).sum()
            share_tokens(self.eval_batches, counted, self.layout.data_parallel, self.layout)
        if plan.teacher_path is None or int(self.layout.pipeline_parallel) > 1:
            return
        teacher = self.teacher
        if teacher is None:
            teacher, _ = checkpoint.load_model(plan.teacher_path, self.layout, dtype=self.dtype,
                                               **training_overrides(self.layout, trained=False))

        teacher.eval()
        with torch.no_grad():
            for batch in self.eval_batches:  # top-k per vocabulary slice, chunked: no full-vocab gather
                batch["teacher"] = teacher_topk(
                    local_logits(teacher, batch["tokens"], batch.get("starts")), min(self.vocab_size, int(d.eval_topk)),
                    float(d.temperature), vocab_size=self.vocab_size, tp_group=self.tp_group,
                    chunk_tokens=int(d.chunk_tokens))
        del teacher

    def sync_parameters(self) -> None:
        """With ``overlap_param_gather`` the optimizer step leaves each rank's copy of the other
        ranks' parameter shards stale until the next training forward gathers them bucket by bucket;
        gather them all now (before a validation pass, a checkpoint or the final weights), as
        Megatron-LM does around its evaluation and saves."""
        if self.model.use_forward_hook:
            self.model.start_param_sync(force_sync=True)

    def evaluate(self) -> dict:
        """Validation LM loss (``val_loss``) and KL to the teacher (``val_kl``) on fixed tokens."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        self.sync_parameters()
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

def share_tokens(batches: list[dict], counted: int, data_parallel: int, layout=None) -> None:
    """Give each micro-batch of a masked global batch the normalizer ``counted / (micro-batches x
    data-parallel ranks)``: the schedule's mean over micro-batches and DDP's over ranks then make
    the loss the mean over the global batch's ``counted`` tokens."""
    value = torch.tensor(max(int(counted), 1) / (len(batches) * data_parallel), dtype=torch.float32)
    for batch in batches:
        batch["loss_tokens"] = layout.place(value) if layout is not None else value


# ----------------------------------------------------------------------------- the stage


