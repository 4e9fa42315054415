"""The GPT layer spec for each purpose (host, train, modelopt); all write the same checkpoint keys."""

from __future__ import annotations

from pipelines.backend import kernels
from pipelines.core.errors import require

SPECS = ("host", "train", "modelopt")


def layer_spec(purpose: str = "train", config=None):
    """The GPT layer spec for ``purpose``; all three write the same checkpoint keys.

    - ``host``: megatron's local spec (plain torch modules). Import and export build on the host
      with it, whatever the node has: no TE module is ever created in host memory.
    - ``train``: transformer-engine's spec when TE and a GPU are present (fused attention, fused
      norm + linear), else the local one with torch's fused attention kernel
      (:class:`pipelines.ops.attention.SDPAttention`). Training, logits, eval and depth pruning use it.
    - ``modelopt``: the spec ModelOpt's width pruning can convert. TE's spec fuses the norms into
      the linears (``input_layernorm`` is an identity there), which ModelOpt 0.43 cannot prune, so
      with TE this is megatron's ModelOpt spec (TE attention and norms, plain linears); without
      TE it is the local spec.

    Checkpoint keys are the TE spec's in every case: the local spec maps its norms to
    ``linear_qkv.layer_norm_weight`` / ``linear_fc1.layer_norm_weight`` in its sharded state dict
    (``sharded_state_dict_keys_map``), and the ModelOpt spec does with ``remap_te_layernorm``.
    TE's ``_extra_state`` (FP8 metadata) is never saved nor asked for
    (:mod:`pipelines.model.checkpoint`), so a checkpoint loads into any of the three.
    """
    from megatron.core.models.gpt import gpt_layer_specs

    require(purpose in SPECS, f"unknown layer spec purpose {purpose!r}; one of {SPECS}", "layer spec")
    if purpose == "host" or not kernels.transformer_engine_available():
        spec = gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm")
        # used where the config's use_te_activation_func is on (pipelines.ops.swiglu.wanted);
        # ops.swiglu and ops.attention load megatron, as gpt_layer_specs does
        from pipelines.ops.swiglu import SwiGLU

        spec.submodules.mlp.submodules.activation_func = SwiGLU
        if purpose == "train":  # torch's fused attention kernel, not megatron's [b, H, s, s] scores
            from pipelines.ops.attention import SDPAttention

            spec.submodules.self_attention.submodules.core_attention = SDPAttention
        return spec
    if purpose == "modelopt":
        from megatron.core.post_training.modelopt.gpt.model_specs import get_gpt_modelopt_spec

        return get_gpt_modelopt_spec(config, remap_te_layernorm=True)
    return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()
