"""Predicted peak memory per GPU of every stage, checked before any GPU time is spent.

``scripts/stage.py`` prints :func:`plan` for the stages it runs or submits (``DRY_RUN=1`` too) and
refuses a stage predicted above ``cluster.gpu_memory_gb``, naming the key to change.
``bench/memory_plan.py`` checks the model against measured peaks on CPU.

The model counts, per GPU (bytes):

- **weights** of the worst pipeline stage (layers / pp, split over tp; the embedding and output
  rows / tp on the first and last stage);
- **gradients**: megatron DDP's gradient buffer, float32 (4 B/param) or, with
  ``grad_reduce_dtype=bfloat16``, bf16 (2 B/param);
- **optimizer**: Adam moments (8 B/param) and, for bf16 parameters, float32 master weights (4 B),
  divided over data-parallel ranks by the distributed optimizer;
- **activations** kept for the backward pass, per layer and token (elements, ``a`` bytes each;
  H heads, G query groups, d head size, f MLP size, r = tp with sequence parallelism, else 1):

  - TE spec (fused norm + linear, flash attention, fused SwiGLU):
    ``4h/r + (2H + 2G)·d/tp + 3f/tp``: the two norms' inputs and outputs, q, k, v and the
    attention output, the fc1 output and the SwiGLU output;
  - local spec (CPU, GPU images without TE; torch's fused attention kernel):
    ``6h + (3H + 3G)·d/tp + 3f/tp``, counted on CPU from the tensors autograd keeps (unique
    storages): each torch norm keeps its input and its normalised input, and the
    linear after it the norm's output; the kernel keeps the rotated q and k and, through v, the
    whole QKV output, the output projection a reshaped copy of the attention output
    (:mod:`pipelines.ops.attention`); the SwiGLU (megatron's compiled one on a GPU,
    :mod:`pipelines.ops.swiglu` on CPU) keeps only its input, as TE's does;
  - ``recompute=full`` keeps only each layer's input (plus one layer's full set while it is
    recomputed); ``selective`` recomputes the core attention (drops q, k, v, the probabilities);

  times the micro-batches in flight (1, or min(pp, micro-batches) on the first stage with the
  1F1B schedule);
- **loss**: the logits ``[tokens, V/tp]`` and the fused loss's stored gradient (both ``a``), plus
  two float32 ``[chunk_tokens, V/tp]`` temporaries (the scaled logits and their softmax; one
  where float32 logits at T = 1 serve as they are, :func:`float32_chunks`), and a weight-sized
  tensor of the output layer's (with gradient-accumulation fusion its GEMM adds into the buffer,
  and megatron hands autograd a dummy gradient of that size instead);
- **teacher**: the online teacher's weights, logits and two float32 chunks;
- **batches**: a step's micro-batches are placed on the device together, with their cached
  top-k (int64 ids, float32 log-probabilities);
- **framework**: on a GPU the CUDA context, NCCL buffers and allocator slack, 3 GiB plus 10%
  (an allowance, not measured here); on CPU the 16 MiB of allocator and Python state the first
  checkpoint load leaves resident (measured).

Forward-only stages (logits, prune, eval) keep no activations: the weights, then the largest of
one layer's transients (the MLP's; attention is a fused kernel on either spec) and the logits
with the top-k's float32 chunks (two; one for float32 logits at T = 1), or sampled labels'
whole-vocabulary chunk and torch's multinomial's buffers (written batch-major, so GPTModel's
final transpose copies nothing).

The single-process stages that run through transformers (quantize, speed) hold their models in
bf16 on one GPU: quantize the student, speed every model of the run at once (they are timed in
turns). On top, the largest model's pass over ``batch x sequence`` tokens: its logits at every
position (counted in float32, the larger of what transformers versions return), one layer's MLP
transients and the KV cache of the tokens it holds. ModelOpt's calibration statistics (a few
values per channel) are not counted.

What it does not know: TE's own workspaces, FP8, activation offloading, and fragmentation beyond
the 10% allowance; and, on a GPU without TE where torch's flash kernel cannot run (float32
training, a head size over 256), the keys and values :mod:`pipelines.ops.attention` repeats per
query head (up to ``2(H − G)·d/tp`` more per token and layer). On CPU ``bench/memory_plan.py``
measures the rest; on a GPU, ``make gpu-check``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pipelines.core.errors import UserError
from pipelines.model import build as model_lib
from pipelines.pruning import search

GIB = 1024 ** 3
FRAMEWORK_BYTES = 3 * GIB      # GPU: CUDA context, NCCL buffers (an estimate, unmeasured here)
FRAGMENTATION = 0.10           # GPU: caching-allocator slack
HOST_FRAMEWORK_BYTES = 16 << 20  # CPU: what the first checkpoint load leaves resident (measured 11-16 MiB)


@dataclass
class Estimate:
    """Predicted bytes per part, and their sum."""

    stage: str
    layout: dict
    parts: dict = field(default_factory=dict)

    @property
    def total(self) -> float:
        return float(sum(self.parts.values()))

    def line(self) -> str:
        parts = ", ".join(f"{name} {value / GIB:.1f}" for name, value in self.parts.items() if value >= 0.05 * GIB)
        layout = f"tp={self.layout['tensor']} pp={self.layout['pipeline']} dp={self.layout['data']}"
        return f"{self.stage:<14} {layout:<16} {self.total / GIB:6.1f} GiB  ({parts})"


def parameters_per_rank(arch: dict, tensor: int, pipeline: int) -> int:
    """Parameters held by the most loaded rank (the first or last pipeline stage)."""
    hidden, ffn, heads = arch["hidden_size"], arch["ffn_hidden_size"], arch["num_attention_heads"]
    groups, head_dim = arch["num_query_groups"], arch["kv_channels"]
    layer = (hidden * head_dim * (heads + 2 * groups) + heads * head_dim * hidden + 3 * hidden * ffn) // tensor
    layer += 2 * hidden  # norms, replicated over tp
    rows = model_lib.padded_vocab_size(arch) * hidden // tensor
    layers = arch["num_layers"] // pipeline * layer
    if pipeline == 1:
        return layers + rows * (1 if arch["tie_word_embeddings"] else 2) + hidden
    return layers + rows + hidden  # first stage: embedding; last: output layer (a copy when tied)


def layer_activations(arch: dict, sequence: int, tensor: int, sequence_parallel: bool, fused: bool,
                      recompute: str, element_bytes: int) -> float:
    """Activation bytes one layer keeps per token for its backward pass."""
    h, f, d = arch["hidden_size"], arch["ffn_hidden_size"], arch["kv_channels"]
    heads, groups = arch["num_attention_heads"], arch["num_query_groups"]
    r = tensor if sequence_parallel else 1
    if recompute == "full":
        return h / r * element_bytes
    mlp = 3 * f / tensor   # fc1 output (the SwiGLU keeps only it) and the SwiGLU output, on every spec
    if fused:
        norms, attention = 4 * h / r, (2 * heads + 2 * groups) * d / tensor
    else:  # torch's norms keep two each; the kernel the rotated q, k and the QKV output; a copy of its output
        norms, attention = 6 * h / r, (3 * heads + 3 * groups) * d / tensor
    if recompute == "selective":  # core attention recomputed: only the output is kept
        attention = heads * d / tensor
    return (norms + attention + mlp) * element_bytes


def float32_chunks(arch: dict, element_bytes: int, temperature: float) -> int:
    """Float32 ``[chunk_tokens, V/tp]`` tensors a loss or a label pass holds at once: the scaled
    logits and their softmax; float32 logits at T = 1 on an unpadded vocabulary are used as they
    are (:meth:`pipelines.ops.kd_loss._Vocab.scaled`, and ``teacher_sampled``), leaving the softmax."""
    as_is = element_bytes == 4 and temperature == 1.0 and model_lib.padded_vocab_size(arch) == arch["vocab_size"]
    return 1 if as_is else 2


def training(arch: dict, *, sequence: int, micro_batch: int, microbatches: int, tensor: int, pipeline: int,
             data: int, element_bytes: int, distributed_optimizer: bool, recompute: str = "none",
             fused: bool = True, sequence_parallel: bool = False, chunk_tokens: int = 4096,
             teacher: dict | None = None, cache_k: int = 0, gpu: bool = True, stage: str = "distill",
             temperature: float = 1.0, gradient_bytes: int = 4) -> Estimate:
    """Peak bytes per GPU of a training step (distill, correct); ``recompute`` is one of :data:`RECOMPUTE`."""
    estimate = Estimate(stage, {"tensor": tensor, "pipeline": pipeline, "data": data})
    parts = estimate.parts
    params = parameters_per_rank(arch, tensor, pipeline)
    tokens = sequence * micro_batch
    vocab = model_lib.padded_vocab_size(arch) // tensor
    parts["weights"] = params * element_bytes
    parts["gradients"] = params * gradient_bytes
    optimizer = params * (8 + (4 if element_bytes < 4 else 0))
    parts["optimizer"] = optimizer / (data if distributed_optimizer else 1)
    layers = arch["num_layers"] // pipeline
    in_flight = min(pipeline, microbatches) if pipeline > 1 else 1
    per_layer = layer_activations(arch, sequence, tensor, sequence_parallel, fused, recompute, element_bytes)
    stored = per_layer * layers
    if recompute == "full":  # one layer's full set while it is recomputed
        stored += layer_activations(arch, sequence, tensor, sequence_parallel, fused, "none", element_bytes)
    hidden = arch["hidden_size"]
    # the final norm's input and output (local spec: its input, normalised input, and the output layer's copy)
    head = (2 if fused else 3) * hidden / (tensor if sequence_parallel else 1) * element_bytes
    parts["activations"] = (stored + head) * tokens * in_flight
    chunk = min(chunk_tokens, tokens)
    scratch = float32_chunks(arch, element_bytes, temperature) * chunk * vocab * 4
    parts["loss"] = 2 * tokens * vocab * element_bytes + scratch + vocab * hidden * element_bytes
    if teacher is not None:
        teacher_vocab = model_lib.padded_vocab_size(teacher) // tensor
        parts["teacher"] = (parameters_per_rank(teacher, tensor, pipeline) * element_bytes
                            + tokens * teacher_vocab * element_bytes + 2 * chunk * teacher_vocab * 4)
    per_sample = sequence * 2 * 8 + sequence * cache_k * (8 + 4)
    parts["batches"] = per_sample * micro_batch * microbatches
    parts["framework"] = FRAMEWORK_BYTES + FRAGMENTATION * estimate.total if gpu else HOST_FRAMEWORK_BYTES
    return estimate


def forward(arch: dict, *, sequence: int, batch: int, tensor: int, element_bytes: int,
            chunk_tokens: int = 1024, gpu: bool = True, stage: str = "logits", data: int = 1,
            sampled: bool = False, temperature: float = 1.0, pipeline: int = 1) -> Estimate:
    """Peak bytes per GPU of a forward-only pass of ``batch`` sequences (logits, prune, eval).

    Nothing is kept between layers, so the peak is the weights plus the largest of: one layer's
    intermediates (the MLP's) and the logits with the top-k's float32 chunks (scaled logits and
    their log-softmax; the log-softmax alone for float32 logits at T = 1). The logits are written batch-major
    (:func:`pipelines.model.build.batch_major_logits`), so GPTModel's transpose copies nothing. Width
    pruning without TE runs megatron's unfused attention (ModelOpt converts only that module);
    its ``[b, H/tp, s, s]`` scores are not counted.

    ``sampled`` labels (``logits.mode=sampled``) instead hold a chunk of the whole vocabulary:
    gathered over the tensor-parallel group (its parts and their concatenation, at ``tp > 1``),
    its float32 softmax, and torch's multinomial's buffers, counted as one float32 chunk on either
    device (on a GPU its normalised copy and prefix sums, read from its CUDA kernel, ``make
    gpu-check`` measures it; on CPU ``bench/memory_plan.py`` measures a fifth to a half of a
    chunk above the softmax at its three sizes).
    Float32 logits at T = 1 are used as they are, without a float32 copy (:func:`float32_chunks`).
    Over ``pipeline`` stages the weights are the most loaded stage's; the logits are counted as if
    on that stage too (the last one holds them).
    """
    estimate = Estimate(stage, {"tensor": tensor, "pipeline": pipeline, "data": data})
    parts = estimate.parts
    tokens = sequence * batch
    f, h = arch["ffn_hidden_size"], arch["hidden_size"]
    vocab = model_lib.padded_vocab_size(arch) // tensor
    parts["weights"] = parameters_per_rank(arch, tensor, pipeline) * element_bytes
    layer = (4 * f / tensor + 4 * h) * tokens * element_bytes  # no [s, s] scores: fused attention
    chunk = min(chunk_tokens, tokens)
    float32 = float32_chunks(arch, element_bytes, temperature)
    if sampled:   # the gathered chunk at tp > 1, the float32 ones, and one for torch's multinomial
        whole = model_lib.padded_vocab_size(arch)
        labels = chunk * whole * (2 * element_bytes * (tensor > 1) + 4 * (float32 + 1))
    else:
        labels = float32 * chunk * vocab * 4
    logits = tokens * vocab * element_bytes + labels
    parts["forward peak"] = max(layer, logits)
    parts["framework"] = FRAMEWORK_BYTES + FRAGMENTATION * estimate.total if gpu else HOST_FRAMEWORK_BYTES
    return estimate


def single_gpu(models: list[dict], *, sequence: int, batch: int, cached_tokens: int, stage: str,
               gpu: bool = True) -> Estimate:
    """Peak bytes of a one-GPU transformers stage (quantize, speed): see the module."""
    from pipelines.evaluation.speed import kv_cache_bytes

    estimate = Estimate(stage, {"tensor": 1, "pipeline": 1, "data": 1})
    parts = estimate.parts
    parts["weights"] = sum(parameters_per_rank(arch, 1, 1) for arch in models) * 2
    largest = max(models, key=lambda arch: parameters_per_rank(arch, 1, 1))
    tokens = sequence * batch
    parts["kv cache"] = kv_cache_bytes(largest, cached_tokens, batch)
    parts["forward peak"] = max(4 * largest["ffn_hidden_size"] * tokens * 2,
                                tokens * model_lib.padded_vocab_size(largest) * 4)
    parts["framework"] = FRAMEWORK_BYTES + FRAGMENTATION * estimate.total if gpu else HOST_FRAMEWORK_BYTES
    return estimate


def ranking_candidate(cfg, source: dict, layout: dict) -> dict | None:
    """The largest shape a search by targets may distill in the prune stage (``prune.search.distill_steps``), or None."""
    if not (search.ranked(cfg) and int(cfg.prune.search.distill_steps) > 0):
        return None
    return search.check_ranked(cfg, source, layout)[0]


def plan(cfg, stages: list[str], checked: dict) -> list[Estimate]:
    """Estimates for the GPU stages of an experiment on its cluster (bf16, TE spec)."""
    fused = True  # the cluster image has TE (without it: torch's attention kernel)
    estimates = []
    teacher, student = checked["teacher"], checked["student"]
    students = checked.get("students") or [student]
    for stage in stages:
        if stage == "quantize" and list(cfg.quantize.formats):
            q = cfg.quantize
            estimates.append(max((single_gpu([arch], sequence=int(q.sequence_length), batch=int(q.batch_size),
                                             cached_tokens=int(q.sequence_length), stage=stage)
                                  for arch in students), key=lambda e: e.total))
        elif stage == "speed" and bool(cfg.eval.speed.enabled):
            s = cfg.eval.speed
            length = int(s.prompt_length)
            estimates.append(single_gpu([teacher, *students], sequence=length, batch=int(s.batch),
                                        cached_tokens=length + int(s.decode_tokens), stage=stage))
        layout = checked["layouts"].get(stage)
        if layout is None:
            continue
        tensor, pipeline, data = int(layout["tensor"]), int(layout["pipeline"]), int(layout["data"])
        if stage in ("correct", "distill"):
            section = cfg[stage]
            arch = student if stage == "distill" else teacher
            per_step = int(section.micro_batch_size) * data
            online = stage == "distill" and str(section.teacher) == "online"
            estimates.append(training(
                arch, sequence=int(section.sequence_length), micro_batch=int(section.micro_batch_size),
                microbatches=int(section.global_batch_size) // per_step, tensor=tensor, pipeline=pipeline,
                data=data, element_bytes=2, distributed_optimizer=bool(section.distributed_optimizer),
                recompute=str(section.recompute), fused=fused, sequence_parallel=tensor > 1,
                chunk_tokens=int(section.chunk_tokens), teacher=teacher if online else None,
                cache_k=int(cfg.logits.k) if stage == "distill" and str(section.teacher) == "cache" else 0,
                stage=stage, temperature=float(section.get("temperature", 1.0)),
                gradient_bytes=2 if str(section.grad_reduce_dtype) == "bfloat16" else 4))
        elif stage == "logits":
            estimates.append(forward(teacher, sequence=int(cfg.logits.sequence_length),
                                     batch=int(cfg.logits.batch_size), tensor=tensor, element_bytes=2,
                                     chunk_tokens=int(cfg.logits.chunk_tokens), stage=stage,
                                     data=data, sampled=str(cfg.logits.mode) == "sampled",
                                     temperature=float(cfg.logits.temperature), pipeline=pipeline))
        elif stage == "prune":
            estimates.append(forward(teacher, sequence=int(cfg.prune.sequence_length),
                                     batch=int(cfg.prune.batch_size), tensor=tensor, element_bytes=2,
                                     stage=stage, data=data, pipeline=pipeline))
            ranking = ranking_candidate(cfg, checked.get("source") or teacher, layout)
            if ranking is not None:   # each candidate's short distillation, in the prune stage's layout
                section = cfg.distill
                estimates.append(training(
                    ranking, sequence=int(section.sequence_length), micro_batch=int(section.micro_batch_size),
                    microbatches=int(section.global_batch_size) // int(section.micro_batch_size), tensor=tensor,
                    pipeline=pipeline, data=1, element_bytes=2, distributed_optimizer=bool(section.distributed_optimizer),
                    recompute=search.ranking_recompute(cfg), fused=fused,
                    sequence_parallel=tensor > 1, chunk_tokens=int(section.chunk_tokens),
                    teacher=teacher if str(section.teacher) == "online" else None,
                    cache_k=int(cfg.logits.k) if str(section.teacher) == "cache" else 0, stage="prune ranking",
                    temperature=float(section.get("temperature", 1.0)),
                    gradient_bytes=2 if str(section.grad_reduce_dtype) == "bfloat16" else 4))
        elif stage == "eval":
            tokens = int(cfg.eval.batch_tokens)
            length = min(int(cfg.eval.max_length), tokens)
            estimates.append(forward(teacher, sequence=length, batch=max(1, tokens // length), tensor=tensor,
                                     element_bytes=2, stage=stage, data=data, pipeline=pipeline))
    return estimates


def check(cfg, estimates: list[Estimate]) -> None:
    """Refuse a stage predicted above ``cluster.gpu_memory_gb``, naming what to change."""
    limit = float(cfg.cluster.get("gpu_memory_gb") or 80) * 1e9
    for estimate in estimates:
        if estimate.total <= limit:
            continue
        stage = estimate.stage
        fixes = {"distill": "distill.micro_batch_size / distill.recompute / parallel.tensor",
                 "correct": "correct.micro_batch_size / correct.recompute / parallel.tensor",
                 "logits": "logits.batch_size / run.stage_parallel.logits",
                 "prune": "prune.batch_size / run.stage_parallel.prune",
                 "prune ranking": "prune.search.distill_recompute / run.stage_parallel.prune (its pipeline size)",
                 "eval": "eval.batch_tokens / run.stage_parallel.eval",
                 "quantize": "quantize.batch_size / quantize.sequence_length",
                 "speed": "eval.speed.batch / eval.speed.prompt_length"}
        raise UserError(f"{stage} is predicted to need {estimate.total / 1e9:.1f} GB per GPU, more than "
                        f"cluster.gpu_memory_gb={limit / 1e9:.0f} ({estimate.line().strip()})", fixes[stage])
