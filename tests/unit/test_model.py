"""The model configs: both go through the same builder and validation."""

import pytest
import torch
import yaml
from helpers import REPO

from pipelines.core.errors import UserError
from pipelines.model import build as model_lib

CONFIGS = REPO / "configs" / "model"


def load(name):
    return model_lib.architecture(yaml.safe_load((CONFIGS / f"{name}.yaml").read_text()))


def test_llama31_8b_has_eight_billion_parameters():
    arch = load("llama3.1-8b")
    model_lib.validate(arch, tensor_parallel=8)
    assert model_lib.count_parameters(arch) == 8_030_261_248  # Llama-3.1-8B's published count
    assert model_lib.padded_vocab_size(arch) == 128256


def test_tiny_builds_and_runs(cpu_runtime):
    arch = load("tiny")
    model = model_lib.build(arch, model_lib.transformer_config(arch, torch.float32))
    counted = sum(p.numel() for p in model.parameters())
    padding = (model_lib.padded_vocab_size(arch) - arch["vocab_size"]) * arch["hidden_size"] * 2
    assert counted == model_lib.count_parameters(arch) + padding
    tokens = torch.randint(0, arch["vocab_size"], (2, 16))
    assert model_lib.forward_logits(model, tokens).shape == (2, 16, 1024)


def test_logits_are_written_batch_major_without_a_copy(cpu_runtime):
    """The same logits and gradients as GPTModel's own [s, b] -> [b, s] copy, in the output layer's
    own storage (a copy of 2 x 32 tokens x 1024 logits would have a storage of its own). The
    gradient goes back down the layers contiguous, as megatron's linear layers take it (autograd's
    transpose would hand the residual stream a batch-major view, which they copy)."""
    arch = load("tiny")
    config = model_lib.transformer_config(arch, torch.float32)
    ours = model_lib.build(arch, config)
    plain = model_lib.build(arch, config)
    plain.load_state_dict(ours.state_dict())
    plain.output_layer._forward_pre_hooks.clear()
    plain.output_layer._forward_hooks.clear()
    written = []
    ours.output_layer.register_forward_hook(lambda module, args, output: written.append(output[0]))
    layouts = []

    def record_layout(module, args, output):
        output[0].register_hook(lambda grad: layouts.append(grad.is_contiguous()))

    for layer in ours.decoder.layers:
        layer.self_attention.linear_proj.register_forward_hook(record_layout)
        layer.mlp.linear_fc2.register_forward_hook(record_layout)
    tokens = torch.randint(0, arch["vocab_size"], (2, 32))
    logits, expected = model_lib.local_logits(ours, tokens), model_lib.local_logits(plain, tokens)
    assert logits.shape == (2, 32, 1024) and logits.is_contiguous()
    assert logits.untyped_storage().data_ptr() == written[0].untyped_storage().data_ptr()
    assert torch.equal(logits, expected)
    weights = torch.randn_like(logits)
    (logits * weights).sum().backward()
    (expected * weights).sum().backward()
    assert layouts == [True] * 2 * len(ours.decoder.layers)
    for (name, a), (_, b) in zip(ours.named_parameters(), plain.named_parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-5), (name, (a.grad - b.grad).abs().max())


def test_validation_names_the_key():
    arch = load("tiny")
    with pytest.raises(UserError, match="fix: parallel.tensor"):
        model_lib.validate(arch, tensor_parallel=4)
    with pytest.raises(UserError, match="fix: model.num_attention_heads"):
        model_lib.validate({**arch, "num_attention_heads": 3})
    with pytest.raises(UserError, match="fix: parallel.pipeline"):
        model_lib.validate(arch, pipeline_parallel=3)


@pytest.mark.parametrize("groups_to_kernel", [True, False], ids=["grouped", "repeated"])
def test_fused_attention_gives_megatrons_values_and_gradients(cpu_runtime, monkeypatch, groups_to_kernel):
    """pipelines.ops.attention (torch's fused kernel) against megatron's unfused DotProductAttention
    with the causal mask, 6 query heads in 3 groups: the keys and values given to the kernel as
    groups (the CPU flash kernel, a GPU's flash kernel) or repeated per query head first (a GPU
    where flash cannot run). Repeating them in the wrong order (``repeat`` for
    ``repeat_interleave``) pairs heads with the wrong group and fails."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from pipelines.ops import attention

    asked = []

    def takes_groups(*tensors):
        asked.append(tensors[1].shape[1])
        return groups_to_kernel

    monkeypatch.setattr(attention, "kernel_takes_groups", takes_groups)
    arch = {**load("tiny"), "num_attention_heads": 6, "num_query_groups": 3}
    config = model_lib.transformer_config(arch, torch.float32)
    ours, theirs = (cls(config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
                    for cls in (attention.SDPAttention, DotProductAttention))
    generator = torch.Generator().manual_seed(0)
    s, b, d = 12, 2, arch["kv_channels"]
    inputs = [torch.randn(s, b, heads, d, generator=generator)
              for heads in (6, 3, 3)]   # query, key, value: [s, b, heads, d]
    grad = torch.randn(s, b, 6 * d, generator=generator)
    results = []
    for module in (ours, theirs):
        leaves = [x.clone().requires_grad_() for x in inputs]
        out = module(*leaves, attention_mask=model_lib.causal_mask(s))
        out.backward(grad)
        results.append((out, *(x.grad for x in leaves)))
    assert asked == [3]   # the fused path ran, and asked about the grouped keys
    for mine, megatrons in zip(*results):
        torch.testing.assert_close(mine, megatrons, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("angles_kind", ["megatron", "distinct_halves"])
def test_rope_gives_megatrons_values_and_gradients(cpu_runtime, dtype, angles_kind):
    """pipelines.ops.rope (megatron's RoPE hook without TE) against megatron's unfused code: the same
    values and gradients (a rounding apart), on a non-contiguous query slice as the QKV split gives;
    built models use it, and the angles' cos and sin are computed once per angle tensor. Angles
    whose two halves differ (megatron's repeat one half) check that each half takes its own."""
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    from pipelines.ops import rope

    arch = load("tiny")
    assert model_lib.transformer_config(arch, torch.float32).apply_rope_fusion   # installed, and set
    inv_freq = model_lib.llama3_inv_freq(64, 500000.0, None)
    angles = torch.outer(torch.arange(16).float(), inv_freq)
    freqs = torch.cat((angles, angles if angles_kind == "megatron" else angles.flip(-1)), -1)[:, None, None, :]
    generator = torch.Generator().manual_seed(0)
    ours_in = torch.randn(16, 3, 4, 64, generator=generator).to(dtype).requires_grad_()
    theirs_in = ours_in.detach().clone().requires_grad_()
    ours_in_view = torch.cat([torch.zeros_like(ours_in), ours_in], -1)[..., 64:]   # a strided view
    grad = torch.randn(16, 3, 4, 64, generator=generator).to(dtype)
    ours = rope.apply_rotary_pos_emb(ours_in_view, freqs)
    theirs = _apply_rotary_pos_emb_bshd(theirs_in, freqs)
    ours.backward(grad)
    theirs.backward(grad)
    # float32: a fused multiply-add's rounding; bfloat16: one unit in the last place, at |x| < 4 for
    # megatron's angles (the distinct halves reach |x| > 4, where a unit is 2**-5: relative there)
    if dtype == torch.float32:
        tolerance = {"rtol": 1e-6, "atol": 1e-6}
    else:
        tolerance = {"rtol": 0 if angles_kind == "megatron" else 2 ** -7, "atol": 2 ** -6}
    torch.testing.assert_close(ours, theirs, **tolerance)
    torch.testing.assert_close(ours_in.grad, theirs_in.grad, **tolerance)
    assert not torch.equal(ours, ours_in.detach())   # it rotated something
    halves = rope._halves(freqs, dtype)
    assert rope._halves(freqs, dtype) is halves   # cached for the same angle tensor


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_is_megatrons_unfused_code_bit_for_bit_keeping_less(cpu_runtime, dtype):
    """pipelines.ops.swiglu (the local spec's activation module without megatron's compiled SwiGLU)
    against megatron's unfused MLP code on the same weights: identical logits and gradients, while
    the tensors kept for the backward pass take less memory (no silu(a) nor b + 0 kept)."""
    from helpers.kept import logits_and_kept_bytes

    from pipelines.ops.swiglu import SwiGLU

    arch = load("tiny")
    config = model_lib.transformer_config(arch, dtype)
    assert config.use_te_activation_func   # no GPU here: ours, not megatron's compiled SwiGLU
    ours = model_lib.build(arch, config)
    assert isinstance(ours.decoder.layers[0].mlp.activation_func, SwiGLU)
    plain = model_lib.build(arch, model_lib.transformer_config(arch, dtype, use_te_activation_func=False))
    assert plain.decoder.layers[0].mlp.activation_func is torch.nn.functional.silu
    plain.load_state_dict(ours.state_dict())
    assert ours.sharded_state_dict().keys() == plain.sharded_state_dict().keys()   # checkpoints as before
    tokens = torch.randint(0, arch["vocab_size"], (2, 32), generator=torch.Generator().manual_seed(0))

    def run(model):
        logits, kept = logits_and_kept_bytes(model, tokens)
        logits.float().square().mean().backward()
        return logits, kept

    (ours_logits, ours_kept), (plain_logits, plain_kept) = run(ours), run(plain)
    assert torch.equal(ours_logits, plain_logits)
    for (name, a), (_, b) in zip(ours.named_parameters(), plain.named_parameters()):
        assert torch.equal(a.grad, b.grad), (name, (a.grad - b.grad).abs().max())
    # per layer and token, megatron's unfused code keeps silu(a) and b + 0 (2 x ffn) that ours does not
    tokens_kept = tokens.numel() * arch["num_layers"] * 2 * arch["ffn_hidden_size"] * dtype.itemsize
    assert plain_kept - ours_kept == tokens_kept, (plain_kept, ours_kept, tokens_kept)


@pytest.mark.parametrize("purpose", ["train", "modelopt"], ids=["torch_fused_attention", "megatron_attention"])
def test_packed_conversations_are_scored_as_if_alone(cpu_runtime, purpose):
    """``data.chat.packing=isolated``: a sample packing two conversations and padding gives each
    the logits it has alone in a sample, through torch's fused attention (training's spec) and
    megatron's own (the pruning spec on CPU). The plain causal mask does not: the second one
    then reads the first."""
    arch = load("tiny")
    torch.manual_seed(0)
    model = model_lib.build(arch, model_lib.transformer_config(arch, torch.float32), purpose=purpose).eval()
    generator = torch.Generator().manual_seed(1)
    first, second = (torch.randint(0, arch["vocab_size"], (1, n), generator=generator) for n in (9, 14))
    pad = torch.zeros(1, 5, dtype=torch.long)
    packed = torch.cat([torch.cat([first, second, pad], 1), torch.cat([second, first, pad], 1)])
    starts = torch.zeros(packed.shape, dtype=torch.bool)
    starts[0, [0, 9, 23]] = True
    starts[1, [0, 14, 23]] = True
    with torch.no_grad():
        isolated = model_lib.local_logits(model, packed, starts)
        plain = model_lib.local_logits(model, packed)
        alone = {n: model_lib.local_logits(model, x) for n, x in ((9, first), (14, second))}
    torch.testing.assert_close(isolated[0, :9], alone[9][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(isolated[0, 9:23], alone[14][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(isolated[1, :14], alone[14][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(isolated[1, 14:23], alone[9][0], rtol=1e-5, atol=1e-5)
    assert (plain[0, 9:23] - alone[14][0]).abs().max() > 1e-2
    positions, mask = model_lib.model_inputs(packed, starts)
    assert positions[0, 9:12].tolist() == [0, 1, 2] and positions[1, 23:].tolist() == [0, 1, 2, 3, 4]
    assert mask.shape == (2, 1, 28, 28) and not mask[0, 0, 12, 9] and mask[0, 0, 12, 8] and mask[0, 0, 9, 10]


def test_packed_conversations_through_transformers_as_if_alone():
    """The same for a Hugging Face model (quantized students are scored and calibrated through one):
    positions and an additive 4D mask, for eager and SDPA attention alike."""
    import transformers

    from pipelines.ops.masks import hf_batch

    config = transformers.LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 100, (2, 20), generator=generator)
    starts = torch.zeros(2, 20, dtype=torch.bool)
    starts[:, 7] = True
    for attention in ("sdpa", "eager"):
        config._attn_implementation = attention
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(config).eval()
        with torch.no_grad():
            packed = model(**hf_batch(tokens, starts)).logits
            alone = model(input_ids=tokens[:, 7:]).logits
            assert hf_batch(tokens) == {"input_ids": tokens}
        torch.testing.assert_close(packed[:, 7:], alone, rtol=1e-5, atol=1e-5)


def test_packed_conversations_are_refused_where_transformer_engine_would_ignore_the_mask(monkeypatch):
    from pipelines.backend import kernels

    monkeypatch.setattr(kernels, "transformer_engine_available", lambda: True)
    tokens = torch.zeros(1, 8, dtype=torch.long)
    model_lib.model_inputs(tokens)   # the plain causal mask is TE's own
    with pytest.raises(UserError, match=r"transformer-engine's attention ignores.*\(fix: data.chat.packing"):
        model_lib.model_inputs(tokens, torch.zeros(1, 8, dtype=torch.bool))
