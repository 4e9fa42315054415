"""Quantization-aware distillation (distill.quantize): the student trains fake-quantized from the
cache, resumes exactly, and is written as a plain model that the quantize stage takes."""

import json

import pytest
import torch
from helpers import compose, run_script, run_torchrun, train_losses
from test_distill import _kill_after_first_checkpoint, distill_args, final_weights, full_cache  # noqa: F401

from pipelines import stages
from pipelines.core.artifacts import read_manifest
from pipelines.model import build as model_lib

QAD = {"distill.kd_weight": 0.7, "quantize.calib_samples": 8, "quantize.batch_size": 4, "distill.eval_interval": 3}


def test_awq_calibration_then_plain_gives_back_the_model(cpu_runtime):
    """AWQ scales the weights by 1/s and the inputs by s; folding the scales back (fold) restores
    the function the model computed before it was quantized."""
    from pipelines.quantization.ptq import group_size
    from pipelines.quantization.qad import FakeQuantization

    arch = model_lib.architecture({**compose("pipeline", ["experiment=demo"]).model})
    torch.manual_seed(0)
    model = model_lib.build(arch, model_lib.transformer_config(arch, torch.float32)).eval()
    tokens = torch.randint(0, arch["vocab_size"], (2, 32))
    before = model_lib.local_logits(model, tokens).detach()
    fake = FakeQuantization("int4_awq", [(torch.randint(0, arch["vocab_size"], (4, 32)), None)], cpu_runtime,
                            group_size("auto", arch))
    fake.apply(model)
    quantized = model_lib.local_logits(model, tokens).detach()
    scales = [m.input_quantizer._pre_quant_scale for m in model.modules() if hasattr(m, "input_quantizer")
              and hasattr(m.input_quantizer, "_pre_quant_scale")]
    assert scales and any((s - 1).abs().max() > 1e-3 for s in scales)   # AWQ moved some scales
    assert (quantized - before).abs().max() > 1e-3                      # and the model is quantized
    FakeQuantization.fold(model)
    torch.testing.assert_close(model_lib.local_logits(model, tokens).detach(), before, rtol=1e-4, atol=1e-4)


def test_qad_trains_through_the_quantizers_resumes_and_writes_a_plain_student(tmp_path, tiny_teacher, tiny_data,
                                                                              full_cache):
    """From the teacher cache, as a plain distillation: KD and CE through the fake-quantized student."""
    settings = {**QAD, "distill.cache": full_cache}
    plain = run_script("scripts/distill.py", *distill_args(tiny_teacher, tiny_data, tmp_path / "plain", **settings))
    assert plain.returncode == 0, plain.stderr[-3000:]
    settings["distill.quantize"] = "int4_awq"
    qad = run_script("scripts/distill.py", *distill_args(tiny_teacher, tiny_data, tmp_path / "qad", **settings))
    assert qad.returncode == 0, qad.stderr[-3000:]
    assert read_manifest(tmp_path / "qad")["quantize"] == "int4_awq"
    assert read_manifest(tmp_path / "plain")["quantize"] is None
    # the quantizers' ranges are in the training checkpoints; the final weights are a plain model's
    metadata = b"".join(p.read_bytes() for p in (tmp_path / "qad" / "train" / "checkpoints").rglob(".metadata"))
    assert b"weight_quantizer._amax" in metadata and b"_pre_quant_scale" in metadata
    a, b = final_weights(tmp_path / "plain"), final_weights(tmp_path / "qad")
    assert a.keys() == b.keys() and not any("quantizer" in k for k in b)
    assert any(not torch.equal(a[k], b[k]) for k in a)   # the quantized forward trained other weights
    # the validation losses are the fake-quantized model's: above the plain run's at step 0
    curve = {m: [json.loads(x) for x in (tmp_path / m / "train" / "metrics.jsonl").read_text().splitlines()
                 if json.loads(x)["kind"] == "eval"] for m in ("plain", "qad")}
    assert curve["qad"][0]["val_loss"] > curve["plain"][0]["val_loss"]
    # a run killed after a checkpoint resumes with the saved ranges and scales: the same student, bit for bit
    args = distill_args(tiny_teacher, tiny_data, tmp_path / "killed", **settings)
    killed_at = _kill_after_first_checkpoint(args)
    resumed = run_script("scripts/distill.py", *args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from step {killed_at} " in resumed.stdout
    again = final_weights(tmp_path / "killed")
    assert all(torch.equal(again[k], b[k]) for k in b)
    # the quantize stage takes the QAD student as any student
    cfg = compose("pipeline", ["experiment=demo", f"data.output={tiny_data}", f"quantize.source={tmp_path / 'qad'}",
                               f"quantize.output={tmp_path / 'quantized'}", "quantize.formats=[int4_awq]",
                               "quantize.calib_samples=8", "quantize.sequence_length=32"])
    stages.run("quantize", cfg)
    assert (tmp_path / "quantized" / "int4_awq" / "hf_quant_config.json").exists()


def _qad(tmp_path, name, student, data, cache, fmt, tensor, **extra):
    settings = {**QAD, "distill.cache": cache, "distill.quantize": fmt, "distill.train_steps": 3,
                "distill.save_interval": 0, "distill.log_interval": 1, "distill.eval_interval": 0, **extra}
    args = distill_args(student, data, tmp_path / name, **settings)
    result = run_torchrun(2, "scripts/distill.py", *args, "parallel.tensor=2") if tensor == 2 else \
        run_script("scripts/distill.py", *args, env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return train_losses(tmp_path / name)


def test_fp8_qad_at_tp2_trains_as_one_process(tmp_path, tiny_teacher, tiny_data, full_cache):
    """Two gloo ranks at parallel.tensor=2: ModelOpt syncs the per-tensor FP8 ranges over the
    split layers, so training through them gives one process's losses."""
    one = _qad(tmp_path, "one", tiny_teacher, tiny_data, full_cache, "fp8", 1)
    two = _qad(tmp_path, "two", tiny_teacher, tiny_data, full_cache, "fp8", 2)
    assert len(one) == 3 and all(abs(a - b) <= 1e-3 for a, b in zip(one, two)), (one, two)


def test_int4_awq_qad_at_tp2_folds_its_split_input_scales_back(tmp_path, tiny_teacher, tiny_data, full_cache):
    """INT4-AWQ at parallel.tensor=2. ModelOpt's AWQ chooses its scales per rank (each rank's
    share of a layer's output error) and averages them over the tensor-parallel group, so the
    quantized model is close to one process's, not the same: its loss before training within 1e-3.
    With no learning (lr 1e-12), the student written at the end is the starting one: the input
    scales of the column- and row-parallel layers fold back into their split weights exactly."""
    tiny = {"distill.lr": 1e-12, "distill.min_lr": 0}
    one = _qad(tmp_path, "one", tiny_teacher, tiny_data, full_cache, "int4_awq", 1, **tiny)
    two = _qad(tmp_path, "two", tiny_teacher, tiny_data, full_cache, "int4_awq", 2, **tiny)
    assert abs(one[0] - two[0]) <= 1e-3, (one, two)
    start, written = final_weights(tiny_teacher), final_weights(tmp_path / "two")
    assert start.keys() == written.keys()
    for key in start:
        torch.testing.assert_close(written[key], start[key], rtol=1e-5, atol=1e-5, msg=key)
