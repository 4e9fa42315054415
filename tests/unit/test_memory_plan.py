"""The memory plan: 8B stages fit an H100 with headroom, overfull stages are refused by key."""

import pytest
from helpers import compose, run_script

from pipelines.core.errors import UserError
from pipelines.launch import memory_plan, preflight
from pipelines.launch import plan as plan_

GB = 1e9


def _plan(experiment, *overrides):
    cfg = compose("pipeline", [f"experiment={experiment}", *overrides])
    stages = plan_.pipeline_stages(cfg)
    return cfg, memory_plan.plan(cfg, stages, preflight.check(cfg, stages))


@pytest.mark.parametrize("experiment", ["llama31_8b_width_4b", "llama31_8b_depth_4b"])
def test_8b_stages_fit_an_80_gb_gpu_with_headroom(experiment):
    cfg, estimates = _plan(experiment)
    assert {e.stage for e in estimates} == {"correct", "prune", "logits", "distill", "quantize", "eval", "speed"}
    # at least the 10% margin bench/time_plan.py chose the layouts with
    assert all(e.total < 0.9 * 80 * GB for e in estimates), [e.line() for e in estimates]
    memory_plan.check(cfg, estimates)
    logits = next(e for e in estimates if e.stage == "logits")
    assert (logits.layout["tensor"], logits.layout["data"]) == (1, 8)  # data-parallel where the teacher fits


def test_tensor_parallel_and_recompute_shrink_the_prediction():
    _, base = _plan("llama31_8b_width_4b")
    _, full = _plan("llama31_8b_width_4b", "distill.recompute=full")
    _, tp1 = _plan("llama31_8b_width_4b", "parallel.tensor=1")
    distill = {name: next(e for e in plan if e.stage == "distill") for name, plan in
               (("base", base), ("full", full), ("tp1", tp1))}
    assert distill["full"].parts["activations"] < 0.2 * distill["base"].parts["activations"]
    assert distill["tp1"].parts["weights"] == pytest.approx(2 * distill["base"].parts["weights"], rel=0.01)


def test_sampled_labels_hold_the_whole_vocabulary_and_the_multinomials_buffers():
    """The logits stage's labels as the config asks: sampled (the default) holds a third float32
    chunk on a GPU (torch's multinomial), and at TP=2 the whole vocabulary gathered, not a slice."""
    def labels_bytes(*overrides):
        _, estimates = _plan("llama31_8b_width_4b", *overrides)
        return next(e for e in estimates if e.stage == "logits").parts["forward peak"]

    chunk = 1024 * 128256 * 4                  # logits.chunk_tokens x Llama-3's vocabulary, float32
    assert labels_bytes() - labels_bytes("logits.mode=topk") == pytest.approx(chunk, rel=0.01)
    tp2 = ["run.stage_parallel.logits.tensor=2"]
    extra = labels_bytes(*tp2) - labels_bytes(*tp2, "logits.mode=topk")
    # sampled: bf16 parts and their concatenation (one float32 chunk's bytes) + 3 float32 chunks;
    # top-k: two float32 chunks of half the vocabulary (one chunk)
    assert extra == pytest.approx(3 * chunk, rel=0.01)


def test_a_stage_predicted_above_the_gpu_is_refused_naming_the_key():
    cfg, estimates = _plan("llama31_8b_width_4b", "distill.micro_batch_size=16", "parallel.tensor=1")
    overfull = {e.stage for e in estimates if e.total > 80 * GB}
    assert overfull == {"correct", "distill"}  # 8B and 4.5B full training state on one GPU each
    with pytest.raises(UserError, match=r"distill is predicted to need .* GB per GPU.*fix: distill.micro_batch_size"):
        memory_plan.check(cfg, [e for e in estimates if e.stage == "distill"])


def test_dry_run_prints_the_plan_and_refuses_an_overfull_experiment():
    ok = run_script("scripts/stage.py", "pipeline", "experiment=llama31_8b_width_4b", "cluster=slurm", "--dry-run")
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "[memory]   distill" in ok.stdout and "[memory]   logits" in ok.stdout
    small = run_script("scripts/stage.py", "distill", "experiment=llama31_8b_width_4b", "cluster=slurm",
                       "cluster.gpu_memory_gb=10", "--dry-run")
    assert small.returncode == 2 and "#SBATCH" not in small.stdout
    assert "predicted to need" in small.stderr and "(fix: distill.micro_batch_size" in small.stderr


def test_the_plan_matches_the_h200_measurement():
    """``make gpu-check`` on one H200 without TE (2026-11-28, the local spec with torch's fused
    attention kernel): the 2-layer slice at 8B width, sequence 8192, bf16, peaked at 39.9 GB
    allocated in training (global batch 4, distributed optimizer) and 3.16 GB above the resident
    state in the logits forward with top-64. (With megatron's unfused attention the same slice
    peaked at 80.1 GB and 26.4 GB.)"""
    from pipelines.model import build as model_lib
    from pipelines.tools import gpu_check

    arch = model_lib.architecture({**compose("pipeline", []).model, **gpu_check.SLICE})
    train = memory_plan.training(arch, sequence=8192, micro_batch=1, microbatches=4, tensor=1, pipeline=1,
                                 data=1, element_bytes=2, distributed_optimizer=True, fused=False,
                                 chunk_tokens=4096, gpu=False)
    assert abs(train.total / 39.9e9 - 1) < 0.05
    forward = memory_plan.forward(arch, sequence=8192, batch=1, tensor=1, element_bytes=2,
                                  chunk_tokens=1024, gpu=False)
    assert abs((forward.total - forward.parts["weights"]) / 3.16e9 - 1) < 0.05


def test_the_local_specs_activation_count_is_what_autograd_keeps(cpu_runtime):
    """The plan's activations for the local spec (CPU, GPU images without TE) against the tensors
    autograd keeps for the backward pass of a real model, counted as unique storages (weights
    excluded): within 1% (what the plan leaves out: the norms' [tokens] reciprocal RMS and the
    attention's log-sum-exp)."""
    import torch
    from helpers.kept import logits_and_kept_bytes

    from pipelines.model import build as model_lib

    arch = model_lib.architecture({**compose("pipeline", []).model, "hidden_size": 256, "num_layers": 4,
                                   "ffn_hidden_size": 768, "num_attention_heads": 4, "num_query_groups": 2,
                                   "kv_channels": 64, "vocab_size": 8192})
    model = model_lib.build(arch, model_lib.transformer_config(arch, torch.float32))
    tokens = torch.randint(0, arch["vocab_size"], (4, 256), generator=torch.Generator().manual_seed(0))
    _, measured = logits_and_kept_bytes(model, tokens)
    predicted = memory_plan.training(arch, sequence=256, micro_batch=4, microbatches=1, tensor=1, pipeline=1,
                                     data=1, element_bytes=4, distributed_optimizer=False, fused=False,
                                     gpu=False).parts["activations"]
    assert abs(predicted / measured - 1) < 0.01, (predicted, measured)


def test_the_ranking_runs_of_a_latency_search_are_planned_and_fit_only_pipelined():
    """llama31_8b_latency distills each candidate inside the prune stage: at PP=8 that fits an H100,
    on one GPU (the prune stage's usual layout) a ~5B student's training state does not."""
    cfg, estimates = _plan("llama31_8b_latency")
    ranking = next(e for e in estimates if e.stage == "prune ranking")
    assert ranking.layout["pipeline"] == 8 and ranking.total < 80 * GB
    memory_plan.check(cfg, estimates)
    # the prune stage's own forward holds one pipeline stage's weights: 4 of 32 layers plus a vocabulary matrix
    pruning = next(e for e in estimates if e.stage == "prune")
    assert pruning.layout["pipeline"] == 8 and 2.5 * GB < pruning.parts["weights"] < 3.5 * GB
    cfg, estimates = _plan("llama31_8b_latency", "run.stage_parallel.prune.pipeline=1")
    with pytest.raises(UserError, match=r"prune ranking is predicted .*fix: prune.search.distill_recompute"):
        memory_plan.check(cfg, estimates)


def test_the_single_gpu_stages_hold_their_models_whole():
    """quantize holds the student, speed every model of the run at once (timed in turns), both in
    bf16 on one GPU; a decode batch that cannot fit is refused naming its key."""
    cfg, estimates = _plan("llama31_8b_width_4b")
    found = {e.stage: e for e in estimates}
    teacher = memory_plan.parameters_per_rank(preflight.check(cfg, ["prune"])["teacher"], 1, 1) * 2
    student = found["quantize"].parts["weights"]
    assert 8 * GB < student < 10 * GB and found["quantize"].layout == {"tensor": 1, "pipeline": 1, "data": 1}
    assert found["speed"].parts["weights"] == teacher + student
    cfg, estimates = _plan("llama31_8b_width_4b", "eval.speed.batch=512", "eval.speed.prompt_length=2048")
    with pytest.raises(UserError, match=r"speed is predicted .*fix: eval.speed.batch"):
        memory_plan.check(cfg, estimates)
