"""Deployment targets of prune=search (pipelines/pruning/targets.py): the latency part model
against whole-model timings, its refusal, the kept timings, and the targets' bad input."""

import pytest
import torch
from helpers import compose
from omegaconf import OmegaConf

from pipelines.backend import distributed
from pipelines.core.errors import UserError
from pipelines.model import build as model_lib
from pipelines.pruning import search, targets
from pipelines.stages import rules

HOST = distributed.Layout(0, 1, 0, 1, 1, 1, 1, torch.device("cpu"))
LATENCY = OmegaConf.create({"batch": 1, "context": 16, "decode_tokens": 2, "repeats": 1, "whole_limit": 4,
                            "check_shapes": 3, "max_error": 0.1})


def demo_search(*overrides):
    cfg = compose("pipeline", ["experiment=demo", "prune=search", "prune.search.max_depth_pruning=0.5", *overrides])
    return cfg, model_lib.architecture(cfg.model)


def shapes(cfg, teacher):
    return search.within_budget(cfg, teacher)


def fake_timer(monkeypatch, curve=0.0):
    """Time shapes by a formula: 1 ms plus per layer 1e-5 x (hidden + ffn), plus ``curve`` x layers²."""
    calls = []

    def time_shape(shape, latency, layout):
        calls.append(targets.shape_name(shape))
        layers = shape["num_layers"]
        return 1.0 + layers * 1e-5 * (shape["hidden_size"] + shape["ffn_hidden_size"]) + curve * layers ** 2

    monkeypatch.setattr(targets, "time_shape", time_shape)
    return calls


def test_the_part_model_adds_up_to_the_whole_timing(monkeypatch, tmp_path):
    cfg, teacher = demo_search("prune.target_params=0.9")
    grid = shapes(cfg, teacher)
    assert len(grid) > LATENCY.whole_limit
    calls = fake_timer(monkeypatch)
    found = targets.latencies(grid, LATENCY, HOST, tmp_path)
    assert found["method"] == "parts" and found["max_error"] < 1e-9
    for shape in grid:   # each shape's modelled time is its formula time
        expected = 1.0 + shape["num_layers"] * 1e-5 * (shape["hidden_size"] + shape["ffn_hidden_size"])
        assert found["ms"][targets.shape_name(shape)] == pytest.approx(expected)
    widths = {targets.width_key(s) for s in grid}
    assert len(calls) == 2 * len(widths) + LATENCY.check_shapes   # two per width, then the check
    targets.check_part_model(found, LATENCY.max_error)
    # kept: the same shapes and settings are not timed again
    calls.clear()
    assert targets.latencies(grid, LATENCY, HOST, tmp_path)["ms"] == found["ms"] and not calls


def test_a_part_model_off_the_whole_timings_is_refused(monkeypatch, tmp_path):
    cfg, teacher = demo_search("prune.target_params=0.9")
    fake_timer(monkeypatch, curve=0.3)   # not linear in the layers: the parts do not add up
    found = targets.latencies(shapes(cfg, teacher), LATENCY, HOST, tmp_path)
    assert found["max_error"] > LATENCY.max_error
    with pytest.raises(UserError, match=r"off by .*\(fix: prune.latency.max_error"):
        targets.check_part_model(found, LATENCY.max_error)


def test_a_small_grid_is_timed_shape_by_shape(monkeypatch, tmp_path):
    cfg, teacher = demo_search("prune.target_params=0.9")
    grid = shapes(cfg, teacher)[:3]
    calls = fake_timer(monkeypatch)
    found = targets.latencies(grid, LATENCY, HOST, tmp_path)
    assert found["method"] == "whole" and calls == [targets.shape_name(s) for s in grid]


def test_random_weights_time_a_real_model():
    """A real timing: a 1-layer and a 3-layer Llama of the demo's width, the deeper one slower."""
    _, teacher = demo_search()
    one = targets.time_shape({**teacher, "num_layers": 1}, OmegaConf.merge(LATENCY, {"repeats": 3}), HOST)
    deep = targets.time_shape({**teacher, "num_layers": 3}, OmegaConf.merge(LATENCY, {"repeats": 3}), HOST)
    assert 0 < one < deep


def test_memory_is_weights_in_the_format_plus_the_kv_cache():
    _, teacher = demo_search()
    memory = OmegaConf.create({"format": "fp8", "context": 100, "batch": 2})
    kv = 2 * teacher["num_layers"] * teacher["num_query_groups"] * teacher["kv_channels"] * 100 * 2 * 2
    assert targets.memory_bytes(teacher, memory) == targets.weight_bytes(teacher, "fp8") + kv
    assert targets.weight_bytes(teacher, "bf16") == 2 * model_lib.count_parameters(teacher)
    assert targets.weight_bytes(teacher, "int4", 64) < targets.weight_bytes(teacher, "fp8") \
        < targets.weight_bytes(teacher, "bf16")


BAD = [  # (overrides, the key the error names)
    (["prune.target_params=null"], "prune.target_params"),                      # no target at all
    (["prune.target_params=null", "prune.target_memory_gb=0.000001"], "prune.target_memory_gb"),   # unreachable
    (["prune.target_params=null", "prune.target_memory_gb=-1"], "prune.target_memory_gb"),
    (["prune.target_memory_gb=1", "prune.search.top_k=10000"], "prune.search.top_k"),   # more than the shapes
    (["prune.target_latency=5", "eval.speed.backend=vllm"], "prune.target_latency"),    # timing refused here
    (["prune.search.distill_steps=4", "distill.teacher=none", "distill.kd_weight=0"], "prune.search.distill_steps"),
    (["prune.search.distill_steps=4", "prune.search.score=mmlu"], "prune.search.score"),
    (["prune.search.distill_steps=2.5"], "prune.search.distill_steps"),
    (["prune.memory.format=int3"], "prune.memory.format"),
    (["prune.latency.context=0"], "prune.latency.context"),
]


@pytest.mark.parametrize("overrides, key", BAD, ids=[" ".join(b[0]) for b in BAD])
def test_bad_targets_name_their_key_before_compute(overrides, key):
    cfg, teacher = demo_search(*overrides)
    with pytest.raises(UserError, match=rf"\(fix: {key}"):
        rules.prune_rules(cfg, teacher, {"tensor": 1, "pipeline": 1})


def test_the_reference_shape_meets_its_own_target(monkeypatch, tmp_path):
    """Timed again, the reference's own shape would be above or below its time by noise alone: it
    keeps the reference's time, so "as fast as this shape" always admits that shape."""
    cfg, teacher = demo_search("prune.target_params=0.9")
    grid = shapes(cfg, teacher)
    fake_timer(monkeypatch)
    reference = grid[len(grid) // 2]
    for whole_limit in (1000, 4):   # timed shape by shape, and by parts
        settings = OmegaConf.merge(LATENCY, {"whole_limit": whole_limit})
        (tmp_path / str(whole_limit)).mkdir()
        found = targets.latencies(grid, settings, HOST, tmp_path / str(whole_limit), reference=reference)
        assert found["ms"][targets.shape_name(reference)] == found["reference_ms"]
