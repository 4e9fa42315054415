"""Llama-family models in megatron-core: one builder for the tiny test model and for 8B.

The architecture is a plain mapping (the ``model`` config group, also stored in every engine
checkpoint as ``model.yaml``). :func:`build` turns it into a megatron ``GPTModel`` for the
current parallel layout, with the layer spec chosen by :func:`pipelines.model.spec.layer_spec`.
"""

from __future__ import annotations

import importlib.util
import math
from typing import Any, Mapping

import torch
import torch.nn.functional as F

from pipelines.backend import kernels
from pipelines.core.errors import require
from pipelines.model.spec import layer_spec
from pipelines.ops import rope
from pipelines.ops.embedding import fuse_gradient
from pipelines.ops.kd_loss import token_logprobs
from pipelines.ops.masks import causal_mask, document_inputs

ARCHITECTURE_KEYS = (
    "num_layers",
    "hidden_size",
    "ffn_hidden_size",
    "num_attention_heads",
    "num_query_groups",
    "kv_channels",
    "vocab_size",
    "max_position_embeddings",
    "rotary_base",
    "rope_scaling",
    "norm_eps",
    "tie_word_embeddings",
    "make_vocab_size_divisible_by",
)


def architecture(model_cfg: Mapping[str, Any]) -> dict:
    """The architecture keys of a model config as a plain dict (what a checkpoint stores)."""
    missing = [key for key in ARCHITECTURE_KEYS if key not in model_cfg]
    require(not missing, f"model config lacks {missing}", "model.<key>")
    arch = {key: model_cfg[key] for key in ARCHITECTURE_KEYS}
    if arch["kv_channels"] is None:
        arch["kv_channels"] = arch["hidden_size"] // arch["num_attention_heads"]
    if arch["rope_scaling"] is not None:
        arch["rope_scaling"] = dict(arch["rope_scaling"])
    return arch


def padded_vocab_size(arch: Mapping[str, Any]) -> int:
    """Vocabulary rounded up to ``make_vocab_size_divisible_by``, independent of the layout.

    Megatron-LM pads by ``divisor × tensor_parallel``; padding by a fixed divisor instead keeps a
    checkpoint loadable at any tensor-parallel size that divides the divisor.
    """
    divisor = int(arch["make_vocab_size_divisible_by"])
    return int(math.ceil(arch["vocab_size"] / divisor) * divisor)


def count_parameters(arch: Mapping[str, Any]) -> int:
    """Parameters of the unpadded model, as Hugging Face counts them."""
    hidden, ffn, layers = arch["hidden_size"], arch["ffn_hidden_size"], arch["num_layers"]
    heads, groups, head_dim = arch["num_attention_heads"], arch["num_query_groups"], arch["kv_channels"]
    attention = hidden * head_dim * (heads + 2 * groups) + heads * head_dim * hidden
    per_layer = attention + 3 * hidden * ffn + 2 * hidden
    embeddings = arch["vocab_size"] * hidden * (1 if arch["tie_word_embeddings"] else 2)
    return layers * per_layer + embeddings + hidden


def validate(arch: Mapping[str, Any], tensor_parallel: int = 1, pipeline_parallel: int = 1) -> None:
    """Check shapes against each other and against the parallel layout, before any compute."""
    heads, groups = arch["num_attention_heads"], arch["num_query_groups"]
    require(heads % groups == 0, f"num_attention_heads={heads} is not divisible by "
            f"num_query_groups={groups}", "model.num_attention_heads")
    require(groups % tensor_parallel == 0, f"num_query_groups={groups} is not divisible by "
            f"tensor parallel size {tensor_parallel}", "parallel.tensor")
    require(arch["ffn_hidden_size"] % tensor_parallel == 0, f"ffn_hidden_size="
            f"{arch['ffn_hidden_size']} is not divisible by tensor parallel size {tensor_parallel}",
            "parallel.tensor")
    require(arch["num_layers"] % pipeline_parallel == 0, f"num_layers={arch['num_layers']} is not "
            f"divisible by pipeline parallel size {pipeline_parallel}", "parallel.pipeline")
    require(padded_vocab_size(arch) % tensor_parallel == 0, "padded vocabulary is not divisible by "
            f"tensor parallel size {tensor_parallel}", "model.make_vocab_size_divisible_by")
    scaling = arch["rope_scaling"]
    if scaling is not None:
        require(scaling.get("type") == "llama3", f"rope_scaling type {scaling.get('type')!r} is not "
                "supported (only 'llama3' or none)", "model.rope_scaling")


def exportable(arch: Mapping[str, Any]) -> bool:
    """Whether Hugging Face can load the shape: transformers 5 requires the hidden size to be a
    multiple of the attention heads even with an explicit head size (its ``validate_architecture``)."""
    return arch["hidden_size"] % arch["num_attention_heads"] == 0


def check_exportable(arch: Mapping[str, Any], key: str) -> None:
    """Refuse a shape Hugging Face cannot load (:func:`exportable`)."""
    hidden, heads = arch["hidden_size"], arch["num_attention_heads"]
    require(exportable(arch), f"hidden_size={hidden} is not a multiple of num_attention_heads={heads}: "
            "transformers cannot load the exported model", key)


def gpu_fusions(on_gpu: bool) -> dict:
    """megatron's fusion switches, each on only where what it needs is installed.

    - ``bias_activation_fusion`` / ``bias_dropout_fusion``: megatron's ``jit_fuser``
      (``torch.compile``), on any GPU.
    - ``persist_layer_norm``: TE's norms only; megatron's torch norm (the local spec, used on a
      GPU without TE) asserts it is off.
    - ``masked_softmax_fusion``: the unfused attention's softmax kernel ``scaled_masked_softmax_cuda``
      (from Apex); megatron imports it on first use, for bf16 scores up to 4096 keys. TE's
      attention (the TE and ModelOpt specs) never uses it.
    """
    te = on_gpu and kernels.transformer_engine_available()
    softmax_kernels = all(importlib.util.find_spec(name) is not None
                  for name in ("scaled_masked_softmax_cuda", "scaled_upper_triang_masked_softmax_cuda"))
    return {"bias_activation_fusion": on_gpu, "bias_dropout_fusion": on_gpu,
            "persist_layer_norm": te, "masked_softmax_fusion": on_gpu and softmax_kernels}


def transformer_config(arch: Mapping[str, Any], dtype: torch.dtype, tensor_parallel: int = 1,
                       pipeline_parallel: int = 1, context_parallel: int = 1, device: torch.device | str = "cpu",
                       **overrides):
    """megatron ``TransformerConfig`` for a Llama architecture (RMSNorm, SwiGLU, RoPE, GQA).

    ``device``: where the model will live, from the runtime layout (``layout.device``), never
    guessed here. ``cpu`` builds in host memory with plain torch kernels, whatever the node has
    (import and export: an 8B model fits in host memory, and the safetensors reader fills host
    tensors); ``cuda`` initializes on the GPU with its fused kernels.
    """
    from megatron.core.transformer.transformer_config import TransformerConfig

    from pipelines.ops.swiglu import wanted as swiglu_wanted  # loads megatron, as the import above

    on_gpu = torch.device(device).type == "cuda"
    fused = gpu_fusions(on_gpu)
    kwargs = dict(
        num_layers=arch["num_layers"],
        hidden_size=arch["hidden_size"],
        ffn_hidden_size=arch["ffn_hidden_size"],
        num_attention_heads=arch["num_attention_heads"],
        num_query_groups=arch["num_query_groups"],
        kv_channels=arch["kv_channels"],
        normalization="RMSNorm",
        layernorm_epsilon=arch["norm_eps"],
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=tensor_parallel,
        pipeline_model_parallel_size=pipeline_parallel,
        context_parallel_size=context_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        use_cpu_initialization=not on_gpu,
        **fused,
        apply_rope_fusion=rope.install(),   # TE's fused RoPE; without TE pipelines.ops.rope's few-pass one
        gradient_accumulation_fusion=False,
        # Pipeline send/recv of a batched p2p op hangs or mismatches on gloo; measured exact without.
        batch_p2p_sync=on_gpu,
        init_method_std=0.02,
    )
    kwargs.update(overrides)
    # without megatron's compiled SwiGLU or TE: pipelines.ops.swiglu's, the local spec's activation module
    kwargs.setdefault("use_te_activation_func", swiglu_wanted(kwargs["bias_activation_fusion"]))
    return TransformerConfig(**kwargs)


def llama3_inv_freq(head_dim: int, base: float, scaling: Mapping[str, Any] | None) -> torch.Tensor:
    """RoPE inverse frequencies, with Llama-3 scaling when ``scaling`` is given (as transformers)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv_freq
    factor = float(scaling["factor"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_context = float(scaling["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_context / low, old_context / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def build(arch: Mapping[str, Any], config, initialize: bool = True, purpose: str = "train"):
    """A ``GPTModel`` holding this process's share of the model, for the current layout.

    ``initialize=False`` leaves weights uninitialized (for loading: no time spent on random init).
    ``purpose`` picks the layer spec (:func:`pipelines.model.spec.layer_spec`); ``purpose="host"``
    goes with a config made for ``device="cpu"``.
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel


    config.perform_initialization = initialize
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(purpose, config),
        vocab_size=padded_vocab_size(arch),
        max_sequence_length=arch["max_position_embeddings"],
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=bool(arch["tie_word_embeddings"]),
        position_embedding_type="rope",
        rotary_base=arch["rotary_base"],
    )
    if not initialize:
        mark_tensor_parallel_weights(model)
    # The local spec's norms are built in float32 whatever params_dtype says (TE's follow it):
    # one dtype for every weight, as megatron's Float16Module gives (RoPE's inv_freq is no buffer).
    model.to(dtype=config.params_dtype)
    if getattr(model, "rotary_pos_emb", None) is not None:
        inv_freq = llama3_inv_freq(arch["kv_channels"], arch["rotary_base"], arch["rope_scaling"])
        model.rotary_pos_emb.inv_freq = inv_freq.to(model.rotary_pos_emb.inv_freq.device)
    if model.post_process and not config.sequence_parallel:
        batch_major_logits(model.output_layer)
    if model.pre_process and config.gradient_accumulation_fusion:   # the trained model (pipelines.training.trainer)

        fuse_gradient(model.embedding.word_embeddings)
    return model


def mark_tensor_parallel_weights(model) -> int:
    """Give each tensor-parallel weight megatron's ``tensor_model_parallel`` attributes where its
    layer left them off; returns how many it marked.

    megatron's local-spec layers (``ColumnParallelLinear``, ``RowParallelLinear``,
    ``VocabParallelEmbedding``) set them only inside their weight initialisation, which a model
    built to be loaded skips (``perform_initialization=False``). Without them every rank but TP
    rank 0 counts its shard of those weights as a copy of rank 0's: the gradient norm (clipping,
    the logged ``grad_norm``) left out all but one shard, ``1/√tp`` of the true norm at even shards,
    and so clipped too little. ``make cluster-check``'s comparison across TP sizes found it."""
    from megatron.core.tensor_parallel import layers

    dims = {layers.ColumnParallelLinear: 0, layers.RowParallelLinear: 1, layers.VocabParallelEmbedding: 0}
    marked = 0
    for module in model.modules():
        dim = next((d for kind, d in dims.items() if isinstance(module, kind)), None)
        weight = getattr(module, "weight", None)
        if dim is None or not isinstance(weight, torch.nn.Parameter):
            continue
        if not getattr(weight, "tensor_model_parallel", False):
            layers.set_tensor_model_parallel_attributes(weight, True, dim, 1)
            marked += 1
    return marked


class _BatchFirst(torch.autograd.Function):
    """``[s, b, h]`` to a contiguous ``[b, s, h]``, and the gradient back to a contiguous ``[s, b, h]``."""

    @staticmethod
    def forward(ctx, hidden):
        return hidden.transpose(0, 1).contiguous()

    @staticmethod
    def backward(ctx, grad):
        return grad.transpose(0, 1).contiguous()


def batch_major_logits(output_layer) -> None:
    """The output layer writes the logits ``[b, s, v]`` at once.

    GPTModel computes them ``[s, b, v]`` and returns ``logits.transpose(0, 1).contiguous()``: for
    b > 1 a copy of the whole ``[tokens, vocab]`` tensor, and another of its gradient in the backward
    pass (the linear layer's backward makes its output's gradient contiguous). Fed the hidden states
    ``[b, s, h]`` instead (a vocabulary-times-smaller copy), the layer's output is ``[b, s, v]``,
    handed back as an ``[s, b, v]`` view of itself, so GPTModel's transpose restores it and
    ``.contiguous()`` copies nothing. Same values, same gradients. Not under sequence parallelism,
    where the layer gathers the sequence along dimension 0.

    The hidden states' gradient goes back sequence-major and contiguous (:class:`_BatchFirst`), one
    copy of ``[s, b, h]``. Autograd's own transpose would hand back a batch-major view, and every
    layer's residual stream would carry that layout down the backward pass: megatron's ``linear_proj``
    and ``linear_fc2`` then copy their output gradient twice each (its matmul folds the strided
    tensor, and its weight-gradient code makes it contiguous again), four copies of ``[s, b, h]``
    per layer.
    """

    def batch_first(module, args, kwargs):
        return (_BatchFirst.apply(args[0]), *args[1:]), kwargs

    def sequence_first_view(module, args, kwargs, output):
        logits, bias = output
        return logits.transpose(0, 1), bias

    output_layer.register_forward_pre_hook(batch_first, with_kwargs=True)
    output_layer.register_forward_hook(sequence_first_view, with_kwargs=True)


def position_ids(tokens: torch.Tensor) -> torch.Tensor:
    """Positions 0..s-1 for a [b, s] batch of tokens."""
    return torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)


def model_inputs(tokens: torch.Tensor, starts: torch.Tensor | None = None):
    """The ``(position_ids, attention_mask)`` a megatron model reads beside ``tokens`` ``[b, s]``:
    plain causal, or with ``starts`` (``[b, s]``, True where a packed conversation begins:
    ``data.chat.packing=isolated``) positions and attention kept within each conversation
    (:mod:`pipelines.ops.masks`).

    transformer-engine's attention applies its causal mask type and ignores a given mask; it would
    need packed-sequence parameters, which the stages do not build: refused there, by name.
    """
    if starts is None:
        return position_ids(tokens), causal_mask(tokens.shape[1], tokens.device)
    require(not kernels.transformer_engine_available(), "data.chat.packing=isolated keeps attention within each "
            "packed conversation through an attention mask, which transformer-engine's attention ignores; on a "
            "TE node use data.chat.packing=one (one conversation a sample, no attention across) or shared "
            "(attention crosses between them)", "data.chat.packing")
    return document_inputs(starts.to(tokens.device))


def local_logits(model, tokens: torch.Tensor, starts: torch.Tensor | None = None) -> torch.Tensor:
    """This tensor-parallel rank's logits ``[b, s, vocab_padded / tp]`` of a one-stage model
    (``starts``: see :func:`model_inputs`)."""
    return model(tokens, *model_inputs(tokens, starts))


def lm_loss(model, batches, vocab_size: int, chunk_tokens: int = 1024, masks=None, starts=None) -> float:
    """Mean next-token cross-entropy of ``model`` over ``[b, s+1]`` token batches (on its device);
    with ``masks`` (``[b, s]`` per batch, or None), over the masked-in labels only; ``starts``
    (``[b, s]`` per batch, or None): where packed conversations begin (:func:`model_inputs`).

    Vocabulary-parallel and chunked (:func:`pipelines.ops.kd_loss.token_logprobs`): no rank gathers
    the full vocabulary, and float32 copies exist for ``chunk_tokens`` tokens at a time.
    """
    from megatron.core import parallel_state


    group = parallel_state.get_tensor_model_parallel_group()
    total, count = 0.0, 0
    with torch.no_grad():
        nothing = iter(lambda: None, 0)
        for batch, mask, begins in zip(batches, masks if masks is not None else nothing,
                                       starts if starts is not None else nothing):
            tokens, labels = batch[:, :-1], batch[:, 1:]
            logits = local_logits(model, tokens, begins)
            picked = token_logprobs(logits, labels[..., None], vocab_size, group, chunk_tokens)[..., 0]
            if mask is None:
                total -= picked.sum().item()
                count += labels.numel()
            else:
                mask = mask.to(picked.device)
                total -= (picked * mask).sum().item()
                count += int(mask.sum().item())
    return total / max(count, 1)


def windows_loss(model, windows, batch_size: int, limit: int | None, vocab_size: int, place=lambda t: t) -> float:
    """:func:`lm_loss` of ``model`` on the first ``limit`` samples of ``windows``
    (:class:`pipelines.data.corpus.TokenWindows`), over the tokens its loss mask counts, with its
    conversations kept apart where they are (``place``: onto the model's device)."""
    return lm_loss(model, map(place, windows.batches(batch_size, limit)), vocab_size,
                   masks=windows.mask_batches(batch_size, limit) if windows.masked else None,
                   starts=windows.start_batches(batch_size, limit))


def forward_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary logits [b, s, vocab_padded] of a one-stage model, gathered over TP ranks.

    This holds the whole vocabulary for every token: for tests and small models. Stages use
    :func:`local_logits` with the vocabulary-parallel helpers of :mod:`pipelines.ops.kd_loss`.
    """
    from megatron.core import tensor_parallel

    logits = local_logits(model, tokens)
    return tensor_parallel.gather_from_tensor_model_parallel_region(logits.contiguous())
