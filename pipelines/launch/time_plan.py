"""Predicted step time, MFU and wall time of every GPU stage, printed before any GPU time is spent.

``scripts/stage.py`` prints :func:`plan` beside the memory plan (``DRY_RUN=1`` too) for the
cluster's GPU (``cluster.gpu``: :data:`GPUS`), and the whole job's GPU-hours.
``bench/time_plan.py`` prints it for the shipped 8B experiments and ranks the layouts each stage
could run with (:func:`best_layouts`).

The model, per micro-batch of ``s·b`` tokens on one GPU of a ``tp × pp × dp`` layout:

- **arithmetic**: the model's FLOPs (:func:`forward_flops`: the linear layers, causal attention
  ``2·s·h`` per token and layer, the output layer; training 3× a forward, plus one more forward of
  the layers with ``recompute=full``, of the core attention with ``selective``), divided over
  ``tp``, at :data:`GEMM_EFFICIENCY` of the GPU's dense bf16 rate;
- **memory-bound work**: the bytes the elementwise kernels move (norms, residual adds, RoPE,
  SwiGLU; :func:`elementwise_bytes`, per spec: TE fuses the norm into the linear, the local spec's
  torch norm makes several float32 passes), the loss over ``[tokens, V/tp]`` (``LOSS_BYTES`` a
  logit, forward and backward), and the optimizer step (``OPTIMIZER_BYTES`` a parameter held,
  over the data-parallel ranks with the distributed optimizer), at :data:`MEMORY_EFFICIENCY` of HBM;
- **tensor parallelism** with sequence parallelism: 4 all-gathers or reduce-scatters of
  ``[s·b, h]`` per layer forward, 4 backward (plus the embedding's and the final norm's), each
  ``(tp−1)/tp`` of it per GPU, over NVLink inside a node, not overlapped (TE's userbuffer overlap
  is off);
- **data parallelism**: the distributed optimizer's reduce-scatter of the gradients (float32, or
  bf16 with ``distill.grad_reduce_dtype=bfloat16``) and all-gather of the bf16 parameters, each
  ``(dp−1)/dp`` of the rank's parameters, over NVLink or, across nodes, the network; with
  ``overlap_grad_reduce`` the reduce-scatter hides behind the last micro-batch's backward and the
  all-gather behind the first forward, and only what outlasts them counts;
- **pipeline parallelism**: the 1F1B bubble, ``(pp−1)/m`` of the micro-batches' time.

Link rates are :data:`LINK_EFFICIENCY` of the per-direction peak. Not modelled: kernel launch and
host overhead (small at 8192 tokens a micro-batch), context parallelism, TE's FP8, checkpoint
saves, the loading of the models, and the data loader (prefetched). :data:`GEMM_EFFICIENCY` is
fitted to the one GPU step the project measured (:data:`CALIBRATION`);
``bench/time_plan.py`` checks the model against Megatron-LM's published Llama-3-8B figure
(:data:`PUBLISHED`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pipelines.core.errors import UserError
from pipelines.launch import memory_plan
from pipelines.model import build as model_lib


@dataclass(frozen=True)
class GPU:
    """Per-GPU peaks from NVIDIA's data sheets (dense, no sparsity)."""

    name: str
    bf16_flops: float    # dense bf16 tensor-core FLOP/s
    hbm: float           # memory bandwidth, B/s
    nvlink: float        # NVLink bandwidth per direction, B/s
    network: float       # inter-node bandwidth per GPU (one NIC each), B/s
    memory_gb: float


GPUS = {
    "h100": GPU("H100 SXM5 80GB", 989e12, 3.35e12, 450e9, 50e9, 80),     # NDR 400 Gb/s per GPU
    "h200": GPU("H200 SXM 141GB", 989e12, 4.8e12, 450e9, 50e9, 141),
    "a100": GPU("A100 SXM4 80GB", 312e12, 2.039e12, 300e9, 25e9, 80),    # HDR 200 Gb/s per GPU
}
GEMM_EFFICIENCY = 0.520     # fraction of the bf16 peak the linear layers' GEMMs reach (fitted: CALIBRATION)
# fraction of the bf16 peak causal flash attention reaches (assumed, from the FlashAttention-2 and -3
# papers' H100 figures at head size 128 and long sequences, forward and backward): torch's flash
# kernel (FlashAttention-2) on the local spec, cuDNN's fused attention (Hopper-tuned) on TE's
ATTENTION_EFFICIENCY = {"local": 0.35, "te": 0.55}
MEMORY_EFFICIENCY = 0.80    # fraction of HBM bandwidth elementwise kernels reach (assumed)
LINK_EFFICIENCY = 0.80      # fraction of the link's peak NCCL's all-gather / reduce-scatter reach (assumed)
LOSS_BYTES = 22             # bytes moved per logit: write, read, float32 scale and softmax, gradient
OPTIMIZER_BYTES = 30        # bytes per parameter an Adam step moves: fp32 grad, master, m, v, bf16 param
GRADIENT_BUFFER_BYTES = 8   # bytes per parameter held: zeroing the fp32 buffer and the clipping norm's read

# The fit: the 8B-width slice on one H200 (docs/reports/2026-11-28-h200.md): 2 layers, hidden
# 4096, MLP 14336, 32 heads, 8 groups, vocabulary 128,256, sequence 8192, global batch 4 in
# micro-batches of 1, CE, the local spec with torch's flash kernel; 0.460 s a step.
CALIBRATION = {"arch": {"num_layers": 2, "hidden_size": 4096, "ffn_hidden_size": 14336, "num_attention_heads": 32,
                        "num_query_groups": 8, "kv_channels": 128, "vocab_size": 128256,
                        "tie_word_embeddings": False, "make_vocab_size_divisible_by": 128},
               "gpu": "h200", "sequence": 8192, "micro_batch": 1, "microbatches": 4, "spec": "local",
               "seconds": 0.460}
# The check: Megatron-LM's Llama-3-8B on 8×H100, bf16, global batch 128, sequence 8192, TP=1
# (DGX Cloud benchmarking recipe): 59.4% MFU.
PUBLISHED = {"arch": {"num_layers": 32, "hidden_size": 4096, "ffn_hidden_size": 14336, "num_attention_heads": 32,
                      "num_query_groups": 8, "kv_channels": 128, "vocab_size": 128256,
                      "tie_word_embeddings": False, "make_vocab_size_divisible_by": 128},
             "gpu": "h100", "sequence": 8192, "global_batch": 128, "gpus": 8, "mfu": 0.594}


def forward_flops(arch: dict, sequence: int) -> tuple[float, float, float]:
    """FLOPs per token of one forward: ``(layers, core attention part of them, output layer)``."""
    h, f, d = arch["hidden_size"], arch["ffn_hidden_size"], arch["kv_channels"]
    heads, groups = arch["num_attention_heads"], arch["num_query_groups"]
    linear = 2 * h * d * (heads + 2 * groups) + 2 * heads * d * h + 2 * 3 * h * f
    attention = 2 * sequence * heads * d      # QKᵀ and AV, 2·2·s·H·d, half of them under the causal mask
    layers = arch["num_layers"] * (linear + attention)
    return float(layers), float(arch["num_layers"] * attention), 2.0 * h * model_lib.padded_vocab_size(arch)


def model_flops_per_token(arch: dict, sequence: int, training: bool = True, causal: bool = True) -> float:
    """Model FLOPs per token, as MFU counts them (recomputation not counted). ``causal=False``:
    attention counted over the whole ``[s, s]`` square, as Megatron-LM's
    ``num_floating_point_operations`` does (its published MFU figures use that count)."""
    layers, attention, output = forward_flops(arch, sequence)
    return (3 if training else 1) * (layers + output + (0 if causal else attention))


def elementwise_bytes(arch: dict, tensor: int, spec: str, element_bytes: int = 2) -> float:
    """Bytes the memory-bound kernels of one layer move per token in a forward (sequence
    parallel: the norms and residuals on ``h/tp``). TE: the norm fused into the next linear (read
    ``h``, write ``h``), RoPE on q and k, SwiGLU ``2f → f``, two residual adds; local: torch's
    RMSNorm (float32 upcast, square, mean, scale, downcast, weight: about 8 passes of ``h``) and
    the few-pass RoPE (3 passes)."""
    h, f, d = arch["hidden_size"], arch["ffn_hidden_size"], arch["kv_channels"]
    heads, groups = arch["num_attention_heads"], arch["num_query_groups"]
    r = tensor
    if spec == "te":
        elements = (4 * h + 6 * h) / r + 2 * (heads + groups) * d / tensor + 3 * f / tensor
    else:
        elements = (16 * h + 6 * h) / r + 3 * (heads + groups) * d / tensor + 3 * f / tensor
    return elements * element_bytes


@dataclass
class StepTime:
    """Predicted seconds of one step (or one forward batch), per part."""

    stage: str
    layout: dict
    tokens: int                      # tokens a step processes (all ranks)
    model_flops: float               # the step's model FLOPs (all ranks)
    gpus: int
    peak: float                      # the GPU's bf16 FLOP/s
    parts: dict = field(default_factory=dict)
    steps: int = 1                   # steps (or batches) the stage runs

    @property
    def seconds(self) -> float:
        return float(sum(self.parts.values()))

    @property
    def mfu(self) -> float:
        return self.model_flops / (self.seconds * self.gpus * self.peak)

    @property
    def wall_hours(self) -> float:
        return self.seconds * self.steps / 3600

    @property
    def gpu_hours(self) -> float:
        return self.wall_hours * self.gpus

    def line(self) -> str:
        layout = f"tp={self.layout['tensor']} pp={self.layout['pipeline']} dp={self.layout['data']}"
        parts = ", ".join(f"{name} {value:.3f}" for name, value in self.parts.items() if value >= 0.0005)
        return (f"{self.stage:<14} {layout:<16} {self.seconds:7.3f} s/step  MFU {self.mfu:5.1%}  "
                f"{self.steps} steps = {self.wall_hours:6.2f} h on {self.gpus} GPUs  ({parts})")


def arithmetic(linear_flops: float, attention_flops: float, gpu: GPU, spec: str) -> float:
    """Seconds of GEMMs at :data:`GEMM_EFFICIENCY` and core attention at :data:`ATTENTION_EFFICIENCY`."""
    return (linear_flops / GEMM_EFFICIENCY + attention_flops / ATTENTION_EFFICIENCY[spec]) / gpu.bf16_flops


def _link(gpu: GPU, group: int, spans_nodes: bool) -> float:
    return (gpu.network if spans_nodes else gpu.nvlink) * LINK_EFFICIENCY if group > 1 else float("inf")


def training_step(arch: dict, gpu: GPU, *, stage: str = "distill", sequence: int, micro_batch: int, microbatches: int,
                  tensor: int = 1, pipeline: int = 1, data: int = 1, gpus_per_node: int = 8, spec: str = "te",
                  recompute: str = "none", distributed_optimizer: bool = True, overlap: bool = True,
                  grad_reduce_bytes: int = 4, teacher: dict | None = None, steps: int = 1) -> StepTime:
    """One optimizer step of distill or correct (``teacher``: an online teacher's forward too)."""
    layers, attention, output = forward_flops(arch, sequence)
    tokens = sequence * micro_batch                           # per micro-batch, per data-parallel rank
    hbm = gpu.hbm * MEMORY_EFFICIENCY
    share = 1 / pipeline
    core = 3 * attention + {"full": attention, "selective": attention}.get(recompute, 0.0)
    linear = 3 * (layers - attention) + (layers - attention if recompute == "full" else 0.0)
    seconds = arithmetic(tokens * (linear * share + 3 * output) / tensor, tokens * core * share / tensor, gpu, spec)
    memory = tokens * (3 * elementwise_bytes(arch, tensor, spec) * arch["num_layers"] * share
                       + LOSS_BYTES * model_lib.padded_vocab_size(arch) / tensor)
    if teacher is not None:
        t_layers, t_attention, t_output = forward_flops(teacher, sequence)
        seconds += arithmetic(tokens * (t_layers - t_attention + t_output) / tensor, tokens * t_attention / tensor,
                              gpu, spec)
        memory += tokens * (elementwise_bytes(teacher, tensor, spec) * teacher["num_layers"]
                            + LOSS_BYTES / 2 * model_lib.padded_vocab_size(teacher) / tensor)
    compute = seconds + memory / hbm
    parts = {"compute": microbatches * compute}
    if tensor > 1:   # sequence parallel: 8 collectives a layer, 4 around the embedding and the head
        collectives = (8 + (4 if recompute == "full" else 0)) * arch["num_layers"] * share + 4
        volume = collectives * (tensor - 1) / tensor * tokens * arch["hidden_size"] * 2
        parts["tensor comm"] = microbatches * volume / _link(gpu, tensor, tensor > gpus_per_node)
    if pipeline > 1:
        parts["pipeline bubble"] = (pipeline - 1) * (parts["compute"] + parts.get("tensor comm", 0)) / microbatches
    params = memory_plan.parameters_per_rank(arch, tensor, pipeline)
    shards = data if distributed_optimizer else 1
    parts["optimizer"] = params * (OPTIMIZER_BYTES / shards + GRADIENT_BUFFER_BYTES) / hbm
    if data > 1:
        link = _link(gpu, data, tensor * pipeline * data > gpus_per_node)
        if distributed_optimizer:
            reduce = (data - 1) / data * params * grad_reduce_bytes / link
            gather = (data - 1) / data * params * 2 / link
        else:
            reduce, gather = 2 * (data - 1) / data * params * grad_reduce_bytes / link, 0.0
        if overlap:   # behind the last micro-batch's backward and the first one's forward
            reduce = max(0.0, reduce - 2 / 3 * compute)
            gather = max(0.0, gather - 1 / 3 * compute)
        parts["data comm"] = reduce + gather
    model = model_flops_per_token(arch, sequence) * tokens * microbatches * data
    return StepTime(stage, {"tensor": tensor, "pipeline": pipeline, "data": data},
                    tokens * microbatches * data, model, tensor * pipeline * data, gpu.bf16_flops, parts, steps)


def forward_step(arch: dict, gpu: GPU, *, stage: str, sequence: int, batch: int, tensor: int = 1, data: int = 1,
                 gpus_per_node: int = 8, spec: str = "te", labels: bool = True, steps: int = 1) -> StepTime:
    """One forward batch (logits, prune, eval) on each data-parallel rank; ``labels``: the logits
    stage's float32 pass over ``[tokens, V/tp]`` (top-k or sampled labels)."""
    layers, attention, output = forward_flops(arch, sequence)
    tokens = sequence * batch
    seconds = arithmetic(tokens * (layers - attention + output) / tensor, tokens * attention / tensor, gpu, spec)
    memory = tokens * elementwise_bytes(arch, tensor, spec) * arch["num_layers"]
    memory += tokens * (LOSS_BYTES / 2 if labels else 2) * model_lib.padded_vocab_size(arch) / tensor
    parts = {"compute": seconds + memory / (gpu.hbm * MEMORY_EFFICIENCY)}
    if tensor > 1:
        volume = (4 * arch["num_layers"] + 2) * (tensor - 1) / tensor * tokens * arch["hidden_size"] * 2
        parts["tensor comm"] = volume / _link(gpu, tensor, tensor > gpus_per_node)
    model = model_flops_per_token(arch, sequence, training=False) * tokens * data
    return StepTime(stage, {"tensor": tensor, "pipeline": 1, "data": data}, tokens * data, model,
                    tensor * data, gpu.bf16_flops, parts, steps)


def cluster_gpu(cfg) -> GPU | None:
    """``cluster.gpu``'s data sheet (None: not set, no time plan)."""
    name = cfg.cluster.get("gpu")
    if name is None:
        return None
    if str(name) not in GPUS:
        raise UserError(f"cluster.gpu={name!r}: one of {', '.join(GPUS)} (the time plan's data sheets)", "cluster.gpu")
    return GPUS[str(name)]


# MMLU, 5-shot: 14,042 questions, about 620 tokens each with their shots (the tokenizer's count
# on the harness's prompts varies by subject); an estimate for the time plan only.
MMLU_TOKENS = 14042 * 620


def plan(cfg, stages: list[str], checked: dict, gpu: GPU | None = None) -> list[StepTime]:
    """Time estimates of the GPU stages of an experiment on ``cluster.gpu`` (bf16, TE spec): one per
    stage, per student for distill (``checked['students']``: their architectures)."""
    gpu = gpu or cluster_gpu(cfg)
    if gpu is None:
        return []
    per_node = int(cfg.cluster.get("gpus_per_node") or 8)
    teacher = checked["teacher"]
    students = checked.get("students") or [checked["student"]]
    estimates = []
    for stage in stages:
        layout = checked["layouts"].get(stage)
        if layout is None:
            continue
        tensor, pipeline, data = int(layout["tensor"]), int(layout["pipeline"]), int(layout["data"])
        common = dict(tensor=tensor, gpus_per_node=per_node)
        if stage in ("correct", "distill"):
            section = cfg[stage]
            micro = int(section.micro_batch_size)
            online = stage == "distill" and str(section.teacher) == "online"
            for arch in (students if stage == "distill" else [teacher]):
                estimates.append(training_step(
                    arch, gpu, stage=stage, sequence=int(section.sequence_length), micro_batch=micro,
                    microbatches=int(section.global_batch_size) // (micro * data), pipeline=pipeline, data=data,
                    recompute=str(section.recompute), distributed_optimizer=bool(section.distributed_optimizer),
                    overlap=bool(section.overlap_grad_reduce),
                    grad_reduce_bytes=2 if str(section.grad_reduce_dtype) == "bfloat16" else 4,
                    teacher=teacher if online else None, steps=int(section.train_steps), **common))
        elif stage == "logits":
            samples = cfg.logits.samples
            batch = int(cfg.logits.batch_size)
            total = int(samples) if samples is not None else 0
            estimates.append(forward_step(teacher, gpu, stage=stage, sequence=int(cfg.logits.sequence_length),
                                          batch=batch, data=data, steps=-(-total // (batch * data)), **common))
        elif stage == "prune":
            batch = int(cfg.prune.batch_size)
            estimates.append(forward_step(teacher, gpu, stage=stage, sequence=int(cfg.prune.sequence_length),
                                          batch=batch, data=data, labels=False,
                                          steps=-(-int(cfg.prune.calib_samples) // (batch * data)), **common))
        elif stage == "eval":
            length = min(int(cfg.eval.max_length), int(cfg.eval.batch_tokens))
            batch = max(1, int(cfg.eval.batch_tokens) // length)
            models = 1 + len(students)
            step = forward_step(teacher, gpu, stage=stage, sequence=length, batch=batch, data=data,
                                labels=False, **common)
            step.steps = -(-models * MMLU_TOKENS // step.tokens)
            estimates.append(step)
    return estimates


def job_lines(estimates: list[StepTime]) -> list[str]:
    """The plan's lines, and the whole job's GPU-hours."""
    lines = [estimate.line() for estimate in estimates]
    hours = sum(e.gpu_hours for e in estimates)
    lines.append(f"job: {sum(e.wall_hours for e in estimates):.2f} h wall, {hours:.1f} GPU-hours "
                 "(compute only: loading, checkpoints and queueing not counted)")
    return lines


def decode_ms(arch: dict, gpu: GPU, batch: int, context: int) -> float:
    """A decode step's milliseconds when it is bound by memory, as at small batches: every bf16
    weight and the KV cache at ``context`` tokens for ``batch`` sequences read once, at
    :data:`MEMORY_EFFICIENCY` of HBM. Kernel launches and the arithmetic are not counted, so a
    measured step is slower: the figure is a floor."""
    from pipelines.evaluation.speed import kv_cache_bytes

    moved = 2 * model_lib.count_parameters(arch) + kv_cache_bytes(arch, context, batch, 2)
    return 1000 * moved / (gpu.hbm * MEMORY_EFFICIENCY)


def latency_lines(cfg, source: dict, gpu: GPU) -> list[str]:
    """Before compute, for a search with a latency target: each shape's floor (:func:`decode_ms`)
    on ``gpu`` against the target; refused when even the floors of every shape are above an
    absolute target (no shape can meet it). A reference target (``prune.latency.reference``) is
    compared by the same model, which only predicts: the prune stage measures."""
    from pipelines.core.errors import require
    from pipelines.pruning import search

    batch, context = int(cfg.prune.latency.batch), int(cfg.prune.latency.context)
    shapes = search.within_budget(cfg, source)
    reference = search.reference_shape(cfg, source)
    floors = [decode_ms(s, gpu, batch, context) for s in shapes]
    if reference is None:
        target = float(cfg.prune.target_latency)
        require(min(floors) <= target, f"prune.target_latency={target} ms: no shape within the limits can decode that "
                f"fast on {gpu.name} (the fastest reads its weights and KV cache in {min(floors):.3f} ms at best)",
                "prune.target_latency")
        what = f"{target} ms"
    else:
        target = decode_ms(reference, gpu, batch, context)
        what = f"the reference's {target:.3f} ms (predicted)"
    meeting = sum(f <= target for f in floors)
    top_k = int(cfg.prune.search.top_k)
    lines = [f"prune latency on {gpu.name} at batch {batch} after {context} tokens (HBM-bound floor): {meeting} of "
             f"{len(shapes)} shapes within {what}; top_k={top_k} are distilled"
             + (f" {int(cfg.prune.search.distill_steps)} steps each" if int(cfg.prune.search.distill_steps) else "")]
    if meeting < top_k:
        lines.append(f"prune: predicted fewer shapes ({meeting}) than prune.search.top_k={top_k}; the stage measures "
                     "and stops naming the key if so")
    return lines
