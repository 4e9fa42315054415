"""Quantization: ModelOpt's unified export read back computes the fake-quantized model; bad input
names its key; the speed report's Pareto front and KV-cache arithmetic."""

import pytest
import torch
from helpers import compose, make_hf_llama

from pipelines.backend import distributed
from pipelines.core.errors import UserError
from pipelines.evaluation.deploy import pareto
from pipelines.evaluation.speed import kv_cache_bytes
from pipelines.launch import plan, preflight
from pipelines.quantization.load import load_fake_quantized, read_tensors
from pipelines.hf.llama_map import read_config
from pipelines.pruning.targets import weight_bytes
from pipelines.quantization.ptq import check_formats, group_size, quantize_export

HOST = distributed.Layout(0, 1, 0, 1, 1, 1, 1, torch.device("cpu"))
ARCH = {"hidden_size": 64, "num_attention_heads": 4, "kv_channels": 16, "ffn_hidden_size": 160}


@pytest.mark.parametrize("fmt", ["fp8", "int4_awq", "int8_sq", "w4a8_awq"])
def test_export_read_back_matches_the_fake_quantized_model(tmp_path, fmt):
    hf = make_hf_llama(tmp_path / "hf", intermediate_size=192, architectures=["LlamaForCausalLM"])
    generator = torch.Generator().manual_seed(0)
    calibration = [(torch.randint(0, 300, (4, 32), generator=generator), None) for _ in range(2)]
    check = (torch.randint(0, 300, (2, 32), generator=generator), None)
    found = quantize_export(hf, fmt, calibration, check, tmp_path / fmt, torch.bfloat16, HOST,
                            group=group_size("auto", {**ARCH, "ffn_hidden_size": 192}))
    # the stage refuses an export further than a tenth of the quantization's own change (int8 and FP8: rounding flips)
    assert found["logit_error"] > 1e-3
    assert found["export_logit_drift"] < 0.1 * found["logit_error"]
    tensors = read_tensors(tmp_path / fmt)
    stored = tensors["model.layers.0.mlp.down_proj.weight"].dtype
    assert stored == {"fp8": torch.float8_e4m3fn, "int8_sq": torch.int8}.get(fmt, torch.uint8)
    assert tensors["model.norm.weight"].dtype == torch.bfloat16   # quantize.export_dtype
    model, algo = load_fake_quantized(tmp_path / fmt)
    assert algo == found["quant_algo"]
    if fmt in ("fp8", "int4_awq"):   # prune.target_memory_gb counts exactly what the export stores
        arch = read_config(hf)
        group = group_size("auto", arch) if fmt == "int4_awq" else None
        stored_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
        assert weight_bytes(arch, fmt.removesuffix("_awq"), group) == stored_bytes
        assert weight_bytes(arch, "bf16") == 2 * sum(t.numel() for t in read_tensors(hf).values())
    with torch.no_grad():
        assert torch.isfinite(model(check[0]).logits).all()


def test_int4_groups_divide_every_linear_input():
    assert group_size("auto", ARCH) == 32           # 160 = 5 x 32
    assert group_size("auto", {**ARCH, "ffn_hidden_size": 192}) == 64
    with pytest.raises(UserError, match=r"does not divide .*ffn_hidden_size.*\(fix: quantize.group_size"):
        group_size(64, ARCH)
    with pytest.raises(UserError, match=r"\(fix: quantize.group_size"):
        group_size("auto", {**ARCH, "hidden_size": 63})


@pytest.mark.parametrize("formats, gpu, message", [
    (["fp9"], False, "unknown format"), (["nvfp4"], False, "only on a GPU"), (["fp8", "fp8"], False, "twice")])
def test_bad_formats_name_the_key(formats, gpu, message):
    with pytest.raises(UserError, match=rf"{message}.*\(fix: quantize.formats"):
        check_formats(formats, gpu)
    assert check_formats(["nvfp4"], True) == ["nvfp4"]


@pytest.mark.parametrize("override, key", [
    ("quantize.formats=[int3]", "quantize.formats"),
    ("prune=width quantize.group_size=64", "quantize.group_size"),   # the width student's hidden size is 48
    ("quantize.calib_samples=0", "quantize.calib_samples"),
    ("quantize.export_dtype=int8", "quantize.export_dtype"), ("quantize.group_size=7", "quantize.group_size"),
    ("eval.speed.backend=vllm", "eval.speed.backend"), ("eval.speed.repeats=0", "eval.speed.repeats"),
    ("eval.speed.prompt_length=5000", "eval.speed.prompt_length")])
def test_bad_deploy_settings_stop_before_compute(override, key):
    cfg = compose("pipeline", ["experiment=demo", *override.split()])
    with pytest.raises(UserError, match=rf"\(fix: {key}"):
        preflight.check(cfg, plan.pipeline_stages(cfg))


def test_an_unfinished_student_is_refused(tmp_path):
    from pipelines.stages.quantize import quantize_inputs

    (tmp_path / "distill_depth").mkdir()
    cfg = compose("pipeline", ["experiment=demo", f"quantize.source={tmp_path / 'distill_depth'}"])
    with pytest.raises(UserError, match=r"not a finished student.*\(fix: quantize.source"):
        quantize_inputs(cfg)


def test_pareto_front_and_kv_cache():
    points = {"teacher": (3.0, 1.0), "depth": (1.0, 1.5), "width": (2.0, 1.2), "worse": (2.5, 1.6)}
    assert pareto(points) == {"teacher", "depth", "width"}
    arch = {"num_layers": 2, "num_query_groups": 2, "kv_channels": 16}
    assert kv_cache_bytes(arch, 100, 3) == 2 * 2 * 2 * 16 * 100 * 3 * 2
