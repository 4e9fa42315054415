"""The time plan: its fit to the one measured GPU step, its check against Megatron-LM's figure,
how its terms move with the layout, and its bad input."""

import pytest
from helpers import compose

from pipelines.core.errors import UserError
from pipelines.launch import memory_plan, plan, preflight
from pipelines.launch import time_plan as tp


def test_the_calibration_reproduces_the_measured_h200_step():
    c = tp.CALIBRATION
    step = tp.training_step(c["arch"], tp.GPUS[c["gpu"]], sequence=c["sequence"], micro_batch=c["micro_batch"],
                            microbatches=c["microbatches"], spec=c["spec"])
    assert step.seconds == pytest.approx(c["seconds"], rel=0.01)


def test_megatrons_published_llama3_8b_mfu_is_within_fifteen_percent():
    """In Megatron-LM's count (attention over the whole square): the model says 0.545 for 0.594."""
    p = tp.PUBLISHED
    step = tp.training_step(p["arch"], tp.GPUS[p["gpu"]], sequence=p["sequence"], micro_batch=1,
                            microbatches=p["global_batch"] // p["gpus"], data=p["gpus"])
    ratio = tp.model_flops_per_token(p["arch"], p["sequence"], causal=False) / tp.model_flops_per_token(
        p["arch"], p["sequence"])
    assert 1.05 < ratio < 1.2
    assert step.mfu * ratio == pytest.approx(p["mfu"], rel=0.15)


def test_layout_terms_move_the_way_the_hardware_does():
    arch, gpu = tp.PUBLISHED["arch"], tp.GPUS["h100"]
    common = dict(sequence=8192, micro_batch=1)
    tp8 = tp.training_step(arch, gpu, microbatches=128, tensor=8, **common)
    tp2 = tp.training_step(arch, gpu, microbatches=32, tensor=2, data=4, **common)
    assert tp8.parts["tensor comm"] > 4 * tp2.parts["tensor comm"] and tp8.mfu < tp2.mfu
    # the gradient reduce-scatter and the parameter all-gather, hidden or not
    hidden = tp.training_step(arch, gpu, microbatches=1, data=8, overlap=True, **common)
    exposed = tp.training_step(arch, gpu, microbatches=1, data=8, overlap=False, **common)
    assert exposed.parts["data comm"] > hidden.parts["data comm"]
    bf16 = tp.training_step(arch, gpu, microbatches=1, data=8, overlap=False, grad_reduce_bytes=2, **common)
    assert bf16.parts["data comm"] == pytest.approx(exposed.parts["data comm"] * 4 / 6)
    # across nodes the data-parallel traffic takes the network
    two_nodes = tp.training_step(arch, gpu, microbatches=1, data=16, overlap=False, **common)
    assert two_nodes.parts["data comm"] > 5 * exposed.parts["data comm"]
    assert tp.GPUS["a100"].bf16_flops < tp.GPUS["h100"].bf16_flops == tp.GPUS["h200"].bf16_flops


def test_the_8b_plan_covers_every_gpu_stage_and_the_job():
    cfg = compose("pipeline", ["experiment=llama31_8b_width_4b"])
    stages = plan.pipeline_stages(cfg)
    checked = preflight.check(cfg, stages)
    timed = tp.plan(cfg, stages, checked)
    assert [t.stage for t in timed] == [s for s in stages if s in checked["layouts"]]
    distill = next(t for t in timed if t.stage == "distill")
    assert distill.steps == cfg.distill.train_steps and distill.gpus == 8 and 0.3 < distill.mfu < 0.6
    assert distill.tokens == 128 * 8192
    lines = tp.job_lines(timed)
    assert lines[-1].startswith("job: ") and "GPU-hours" in lines[-1]
    # the shipped layout fits with the margin bench/time_plan.py asks of it
    memory = next(e for e in memory_plan.plan(cfg, stages, checked) if e.stage == "distill")
    assert memory.total < 0.9 * cfg.cluster.gpu_memory_gb * 1e9


def test_an_unknown_gpu_names_the_key():
    cfg = compose("pipeline", ["experiment=llama31_8b_width_4b", "cluster.gpu=v100"])
    with pytest.raises(UserError, match=r"\(fix: cluster.gpu\)"):
        tp.cluster_gpu(cfg)
    assert tp.plan(compose("pipeline", ["experiment=demo"]), ["distill"], {"layouts": {}}) == []


def test_the_decode_floor_and_the_latency_check_before_compute():
    """The HBM-bound decode floor: the bf16 weights and the KV cache once, at 80% of HBM; a target
    even the floors miss is refused, a reference target is counted against the same model."""
    from pipelines.model.build import count_parameters

    arch, gpu = {**tp.PUBLISHED["arch"], "num_query_groups": 8, "kv_channels": 128}, tp.GPUS["h100"]
    moved = 2 * count_parameters(arch) + 2 * 32 * 8 * 128 * 4096 * 2
    assert tp.decode_ms(arch, gpu, 1, 4096) == pytest.approx(1000 * moved / (gpu.hbm * 0.8))
    assert tp.decode_ms({**arch, "num_layers": 16}, gpu, 1, 4096) < tp.decode_ms(arch, gpu, 1, 4096)
    cfg = compose("pipeline", ["experiment=llama31_8b_latency"])
    teacher = preflight.model_lib.architecture(cfg.model)
    lines = tp.latency_lines(cfg, teacher, gpu)
    assert "shapes within the reference's" in lines[0]
    absolute = compose("pipeline", ["experiment=llama31_8b_latency", "prune.latency.reference=null",
                                    "prune.target_latency=0.5"])
    with pytest.raises(UserError, match=r"no shape within the limits can decode that fast.*fix: prune.target_latency"):
        tp.latency_lines(absolute, teacher, gpu)
