"""What CPU can prove of the GPU path: spec-independent checkpoint keys, host-memory import,
batches placed in one place, refused context parallelism, tested versions, the vocabulary-split
top-k of the logits stage, tied embeddings under pipeline parallelism, bf16 with fp32 master
weights, and the distributed optimizer."""

import json
import re
from pathlib import Path

import pytest
import torch
from helpers import REPO, compose, import_cfg, import_hf_llama, make_hf_llama, run_script, run_torchrun
from omegaconf import OmegaConf

from pipelines.backend import distributed, kernels
from pipelines.core.errors import UserError
from pipelines.model import build as model_lib
from pipelines.model import checkpoint, spec
from pipelines.ops.kd_loss import TopK
from pipelines.stages import import_


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_checkpoint_holds_exactly_the_te_spec_keys(tmp_path, cpu_runtime, tie):
    """A checkpoint written here (local spec) holds the keys TE's spec asks for, no more, no less."""
    source = make_hf_llama(tmp_path / "hf", tie=tie)
    import_.import_hf(import_cfg(source, tmp_path / "ckpt"))
    arch, _ = checkpoint.read_architecture(tmp_path / "ckpt")
    assert checkpoint.saved_keys(tmp_path / "ckpt") == checkpoint.te_spec_keys(arch)
    # the in-memory local model names its norms differently: the remapping is what makes this hold
    model, _ = checkpoint.load_model(tmp_path / "ckpt", cpu_runtime)
    assert "decoder.layers.0.input_layernorm.weight" in dict(model.named_parameters())


def test_te_extra_state_is_neither_saved_nor_required(tmp_path, cpu_runtime, monkeypatch):
    """A TE model also asks for ``_extra_state`` objects, which no checkpoint holds: loading skips them."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    source = make_hf_llama(tmp_path / "hf")
    import_.import_hf(import_cfg(source, tmp_path / "ckpt"))
    model, _ = checkpoint.load_model(tmp_path / "ckpt", cpu_runtime)
    original = type(model).sharded_state_dict

    def with_extra_state(self, *args, **kwargs):  # what TELayerNormColumnParallelLinear adds
        state = original(self, *args, **kwargs)
        key = "decoder.layers.0.self_attention.linear_qkv._extra_state"
        state[key] = ShardedObject(key, None, (1,), (0,), replica_id=0)
        return state

    monkeypatch.setattr(type(model), "sharded_state_dict", with_extra_state)
    checkpoint.load_weights(model, tmp_path / "ckpt")  # would fail: the key is not in the checkpoint
    checkpoint.save_weights(model, tmp_path / "again")
    assert checkpoint.saved_keys(tmp_path / "again") == checkpoint.saved_keys(tmp_path / "ckpt")


def test_import_and_export_build_on_the_host_even_on_a_gpu_node(monkeypatch):
    """On a GPU node the training spec is TE's, but import/export build the local spec in host memory."""
    from megatron.core.models.gpt import gpt_layer_specs

    arch = model_lib.architecture(OmegaConf.load(REPO / "configs" / "model" / "tiny.yaml"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(kernels, "transformer_engine_available", lambda: True)
    calls = []
    monkeypatch.setattr(gpt_layer_specs, "get_gpt_layer_with_transformer_engine_spec",
                        lambda *a, **k: calls.append("te"))
    assert model_lib.transformer_config(arch, torch.float32, device="cpu").use_cpu_initialization
    assert not model_lib.transformer_config(arch, torch.float32, device="cuda").use_cpu_initialization
    spec.layer_spec("host")
    assert calls == []
    spec.layer_spec("train")
    assert calls == ["te"]


def test_gpu_config_without_te_builds_and_trains_in_bf16(cpu_runtime, monkeypatch):
    """A GPU image without TE (found on the first GPU run: megatron's torch norm asserts
    ``persist_layer_norm`` off, and the unfused softmax imports an Apex kernel for bf16 scores):
    the config made as on a GPU must build the local spec and run forward and backward in bf16."""
    arch = model_lib.architecture(OmegaConf.load(REPO / "configs" / "model" / "tiny.yaml"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(kernels, "transformer_engine_available", lambda: False)
    config = model_lib.transformer_config(arch, torch.bfloat16, device="cuda")
    monkeypatch.undo()
    assert config.bias_activation_fusion and not config.persist_layer_norm and not config.masked_softmax_fusion
    config.use_cpu_initialization = True  # the parameters on this machine's host
    model = model_lib.build(arch, config)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    tokens = torch.randint(0, arch["vocab_size"], (2, 64), generator=torch.Generator().manual_seed(0))
    logits = model_lib.local_logits(model, tokens)
    logits.float().logsumexp(-1).mean().backward()
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    assert all(p.grad is not None for p in model.parameters())


def test_place_moves_every_tensor_of_a_batch():
    layout = distributed.Layout(0, 1, 0, 1, 1, 1, 1, torch.device("meta"))
    batch = {"tokens": torch.zeros(2, 3, dtype=torch.long), "labels": torch.zeros(2, 3),
             "teacher": TopK(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), torch.zeros(2, 3)), "none": None}
    placed = layout.place(batch)
    assert isinstance(placed["teacher"], TopK) and placed["none"] is None
    tensors = [placed["tokens"], placed["labels"], *placed["teacher"]]
    assert all(t.device.type == "meta" for t in tensors)


def test_stages_cross_to_the_device_only_through_layout_place():
    """Stage code never moves data itself (a missing move costs nothing on CPU, so grep for it)."""
    offenders = []
    paths = sorted((REPO / "pipelines").rglob("*.py"))
    assert len(paths) > 40
    for path in paths:
        if path.relative_to(REPO / "pipelines").parts[0] == "backend":   # the runtime: the one place
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"\.cuda\(|\.to\((layout\.)?device|\.to\(self\.layout\.device", line):
                offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert offenders == []


def test_context_parallelism_is_refused_naming_the_key():
    cfg = compose("pipeline", ["experiment=llama31_8b_width_4b", "parallel.context=2"])
    from pipelines.launch import preflight

    with pytest.raises(UserError, match=r"fix: parallel.context"):
        preflight.check(cfg, ["distill"])
    with pytest.raises(UserError, match=r"context parallelism \(2\) is not supported.*fix: parallel.context"):
        distributed.initialize(OmegaConf.create({"tensor": 1, "pipeline": 1, "context": 2}))


def test_untested_library_versions_stop_with_the_tested_ones_named(monkeypatch):
    monkeypatch.delenv("PIPELINES_ALLOW_UNTESTED_VERSIONS", raising=False)
    distributed.check_versions()  # this environment has the tested versions
    monkeypatch.setitem(distributed.TESTED_VERSIONS, "megatron-core", "0.99.0")
    with pytest.raises(UserError, match=r"megatron-core 0\.16\.1 \(tested: 0\.99\.0\)"):
        distributed.check_versions()
    monkeypatch.setenv("PIPELINES_ALLOW_UNTESTED_VERSIONS", "1")
    distributed.check_versions()


def test_a_shadowing_import_and_a_transformer_engine_out_of_range_are_refused(monkeypatch):
    """The installed metadata can say 0.16.1 while Python imports another megatron.core (an NGC
    image's source checkout on PYTHONPATH); transformer-engine must sit in the range megatron-core
    declares (2.7, in the NeMo 25.09 image the Dockerfile once used, does not)."""
    import megatron.core

    monkeypatch.delenv("PIPELINES_ALLOW_UNTESTED_VERSIONS", raising=False)
    imported = distributed.check_versions()
    assert imported["megatron-core"] == ("0.16.1", str(Path(megatron.core.__file__).parent))
    monkeypatch.setattr(megatron.core, "__version__", "0.14.0")
    with pytest.raises(UserError, match=r"megatron-core 0\.16\.1 is installed but 0\.14\.0 is imported from"):
        distributed.check_versions()
    monkeypatch.undo()
    monkeypatch.delenv("PIPELINES_ALLOW_UNTESTED_VERSIONS", raising=False)
    for found, refused in (("2.7.0", True), ("2.9.0", False), ("2.11.0+abc", False), ("2.12.0", True)):
        monkeypatch.setattr(distributed, "transformer_engine_version", lambda: (found, "/opt/te"))
        if refused:
            with pytest.raises(UserError, match=rf"transformer-engine {re.escape(found)} at /opt/te"):
                distributed.check_versions()
        else:
            assert distributed.check_versions()["transformer-engine"] == (found, "/opt/te")


def _cache(folder):
    from pipelines.data.logits_cache import LogitsCache

    cache = LogitsCache(folder, None)
    return [cache[i] for i in range(len(cache))]


def test_logits_stage_at_tp2_with_short_chunks_writes_tp1s_top_k(tmp_path, trained_teacher, tiny_data):
    """TP=2 (vocabulary split, top-k per rank on 16-token chunks, merged) writes the same ids as
    TP=1 and log-probabilities within one float16 step."""
    common = [f"logits.teacher={trained_teacher}", f"data.output={tiny_data}", "logits.mode=topk", "logits.k=8",
              "logits.samples=8", "logits.samples_per_shard=4", "logits.sequence_length=32",
              "logits.batch_size=4"]
    one = run_script("scripts/logits.py", *common, f"logits.output={tmp_path / 'tp1'}")
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_torchrun(2, "scripts/logits.py", *common, f"logits.output={tmp_path / 'tp2'}",
                       "parallel.tensor=2", "logits.chunk_tokens=16")
    assert two.returncode == 0, two.stderr[-3000:]
    for (ids1, lp1, tail1), (ids2, lp2, tail2) in zip(_cache(tmp_path / "tp1"), _cache(tmp_path / "tp2")):
        assert torch.equal(ids1, ids2)
        step = (lp1.abs().float() * 2.0 ** -10).clamp_min(2.0 ** -24)  # float16 spacing (10-bit mantissa)
        assert torch.all((lp1.float() - lp2.float()).abs() <= step + 1e-6)
        assert torch.allclose(tail1.float(), tail2.float(), atol=2e-3)


def test_vocabulary_parallel_lm_loss_equals_cross_entropy(cpu_runtime):
    import torch.nn.functional as F

    arch = model_lib.architecture(OmegaConf.load(REPO / "configs" / "model" / "tiny.yaml"))
    model = model_lib.build(arch, model_lib.transformer_config(arch, torch.float32)).eval()
    batches = [torch.randint(0, arch["vocab_size"], (2, 17), generator=torch.Generator().manual_seed(i))
               for i in range(2)]
    ours = model_lib.lm_loss(model, batches, arch["vocab_size"], chunk_tokens=5)
    with torch.no_grad():
        logits = torch.cat([model_lib.forward_logits(model, b[:, :-1])[..., : arch["vocab_size"]] for b in batches])
    labels = torch.cat([b[:, 1:] for b in batches])
    reference = F.cross_entropy(logits.flatten(0, 1), labels.flatten()).item()
    assert abs(ours - reference) <= 1e-5


def _train(student, data, output, *extra, processes=1):
    args = [f"distill.student={student}", f"distill.output={output}", f"data.output={data}",
            "distill.teacher=none", "distill.kd_weight=0", "distill.sequence_length=32",
            "distill.micro_batch_size=2", "distill.global_batch_size=8", "distill.train_steps=3",
            "distill.warmup_steps=1", "distill.lr=3e-3", "distill.min_lr=3e-4", "distill.eval_interval=0",
            "distill.eval_samples=8", "distill.save_interval=0", *extra]
    result = (run_script("scripts/distill.py", *args, env={"OMP_NUM_THREADS": "1"}) if processes == 1
              else run_torchrun(processes, "scripts/distill.py", *args))
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(x) for x in (Path(output) / "train" / "metrics.jsonl").read_text().splitlines()]
    return [x["loss"] for x in lines if x["kind"] == "train"]


@pytest.fixture(scope="module")
def tied_student(tmp_path_factory, tiny_data):
    return import_hf_llama(tmp_path_factory.mktemp("tied"), tiny_data / "tokenizer", tie=True, num_hidden_layers=4)


def test_tied_embeddings_at_pp2_end_with_one_process_weights(tmp_path, tied_student, tiny_data):
    """The first stage's embedding and the last stage's output layer are one tied weight: without
    finalize_model_grads' all-reduce over the embedding group they drift apart after a step."""
    _train(tied_student, tiny_data, tmp_path / "one")
    _train(tied_student, tiny_data, tmp_path / "two", "parallel.pipeline=2", processes=2)
    layout = distributed.initialize(OmegaConf.create({"tensor": 1, "pipeline": 1}))
    one, _ = checkpoint.load_model(tmp_path / "one", layout)
    two, _ = checkpoint.load_model(tmp_path / "two", layout)
    start, _ = checkpoint.load_model(tied_student, layout)
    a, b = one.state_dict(), two.state_dict()
    moved = (a["embedding.word_embeddings.weight"] - start.state_dict()["embedding.word_embeddings.weight"]).abs().max()
    assert moved > 1e-3  # training changed the tied weight, so the comparison below means something
    for key, value in a.items():
        if isinstance(value, torch.Tensor) and not key.endswith("_extra_state"):
            assert (value - b[key]).abs().max().item() <= 1e-5, key


@pytest.fixture(scope="module")
def plain_losses(tmp_path_factory, tied_student, tiny_data):
    """3 CE steps in one process: float32, the plain (non-distributed) optimizer, no recompute."""
    folder = tmp_path_factory.mktemp("plain") / "out"
    return _train(tied_student, tiny_data, folder, "distill.dtype=float32", "distill.distributed_optimizer=false",
                  "distill.recompute=none")


def test_bf16_parameters_with_fp32_master_weights_track_float32(tmp_path, tied_student, tiny_data, plain_losses):
    """megatron's mixed-precision optimizer on CPU: bf16 parameters, float32 master weights."""
    half = _train(tied_student, tiny_data, tmp_path / "bf16", "distill.dtype=bfloat16")
    arch, dtype = checkpoint.read_architecture(tmp_path / "bf16")
    assert dtype == torch.bfloat16
    assert all(abs(x - y) <= 0.02 * abs(x) for x, y in zip(plain_losses, half)), (plain_losses, half)


def test_distributed_optimizer_at_dp2_matches_the_plain_optimizer(tmp_path, tied_student, tiny_data, plain_losses):
    sharded = _train(tied_student, tiny_data, tmp_path / "sharded", "distill.distributed_optimizer=true",
                     processes=2)
    assert len(plain_losses) == len(sharded) == 3
    assert all(abs(x - y) <= 1e-5 for x, y in zip(plain_losses, sharded)), (plain_losses, sharded)


@pytest.mark.parametrize("recompute", ["selective", "full"])
def test_activation_recompute_gives_the_same_losses(tmp_path, tied_student, tiny_data, plain_losses, recompute):
    again = _train(tied_student, tiny_data, tmp_path / recompute, f"distill.recompute={recompute}",
                   "distill.distributed_optimizer=false")
    assert all(abs(x - y) <= 1e-6 for x, y in zip(plain_losses, again)), (plain_losses, again)


def test_gpu_check_says_there_is_no_gpu_and_fails():
    result = run_script("scripts/gpu_check.py")
    assert result.returncode == 2
    assert "no GPU on this machine" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("groups_to_kernel", [True, False], ids=["grouped", "repeated"])
def test_gpu_check_attention_part_checks_the_path_and_the_values(cpu_runtime, monkeypatch, groups_to_kernel):
    """gpu-check's attention part, on CPU at a small shape (8 heads in 2 groups): it reports the
    path SDPAttention took and its values against megatron's; it fails when the values differ (a
    kernel given the wrong scale) and when only torch's math kernel could run (attention dropout,
    which no fused CPU kernel takes: on a GPU, the case of grouped keys the flash kernel cannot take)."""
    import torch.nn.functional as F
    import yaml

    from pipelines.ops import attention
    from pipelines.tools import gpu_check

    arch = model_lib.architecture(yaml.safe_load((REPO / "configs" / "model" / "tiny.yaml").read_text()))
    arch = {**arch, "num_attention_heads": 8, "num_query_groups": 2, "kv_channels": 32}
    monkeypatch.setattr(attention, "kernel_takes_groups", lambda *tensors: groups_to_kernel)
    shape = dict(sequence=256, check_sequence=64)
    figures = gpu_check.attention_paths(arch, torch.device("cpu"), **shape)
    assert [f["path"] for f in figures.values()] == ["grouped" if groups_to_kernel else "repeated"] * 2
    assert figures["float32"]["max_error"] < 1e-5 and figures["bfloat16"]["max_error"] < 2e-2
    assert figures["float32"]["scores_gb"] == 8 * 256 * 256 * 4 / 1e9

    plain = F.scaled_dot_product_attention
    monkeypatch.setattr(attention.F, "scaled_dot_product_attention",
                        lambda *args, **kwargs: plain(*args, **{**kwargs, "scale": kwargs["scale"] * 1.1}))
    with pytest.raises(RuntimeError, match="differs from megatron's unfused attention"):
        gpu_check.attention_paths(arch, torch.device("cpu"), dtypes=("float32",), **shape)
    monkeypatch.setattr(attention.F, "scaled_dot_product_attention",
                        lambda *args, **kwargs: plain(*args, **kwargs, dropout_p=0.5))
    with pytest.raises(RuntimeError, match="No available kernel"):
        gpu_check.attention_paths(arch, torch.device("cpu"), dtypes=("float32",), **shape)


def test_gpu_check_runs_its_attention_part(tmp_path, cpu_runtime, monkeypatch, capsys):
    """``gpu_check.py --part attention`` end to end (the environment check bypassed, the sequence
    shortened to 128 at 8B's attention shape): its figures in result.json and its line printed."""
    from pipelines.tools import gpu_check

    monkeypatch.setattr(gpu_check, "environment", lambda: {"gpu": "none (test)"})
    monkeypatch.setattr(gpu_check, "SLICE_SEQUENCE", 128)
    gpu_check.main(["--part", "attention", f"paths.runs={tmp_path}"])
    result = json.loads((tmp_path / "gpu_check" / "result.json").read_text())
    assert set(result["attention"]) == {"bfloat16", "float32"}
    assert result["attention"]["float32"]["scores_gb"] == 32 * 128 * 128 * 4 / 1e9
    out = capsys.readouterr().out
    assert "attention at 8B's shape" in out and "float32 grouped keys" in out and "[gpu-check] passed" in out
