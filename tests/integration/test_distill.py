"""The distill stage: exact resume after kill -9, cache == online, DP=2 == DP=1, bad input."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import REPO, child_env, compose, import_cfg, import_hf_llama, make_hf_llama, run_script, run_torchrun

from pipelines import stages
from pipelines.core.errors import UserError
from pipelines.model import checkpoint

SEQ = 32


@pytest.fixture(scope="module")
def full_cache(tmp_path_factory, trained_teacher, tiny_data):
    """The trained teacher's soft labels with k = the whole vocabulary (300)."""
    folder = tmp_path_factory.mktemp("cache") / "k300"
    stages.run("logits", compose("pipeline", [
        f"logits.teacher={trained_teacher}", f"logits.output={folder}", f"data.output={tiny_data}",
        "logits.mode=topk", "logits.k=300", "logits.value_dtype=float32", "logits.samples=96", "logits.samples_per_shard=16",
        f"logits.sequence_length={SEQ}", "logits.batch_size=8"]))
    return folder


def distill_args(student, data, output, **extra):
    values = {"distill.student": student, "distill.output": output, "data.output": data,
              "distill.sequence_length": SEQ, "distill.micro_batch_size": 2,
              "distill.global_batch_size": 8, "distill.train_steps": 6, "distill.warmup_steps": 1,
              "distill.lr": 3e-3, "distill.min_lr": 3e-4, "distill.eval_interval": 0,
              "distill.eval_samples": 8, "distill.save_interval": 2, **extra}
    return [f"{key}={value}" for key, value in values.items()]


def final_weights(folder):

    model, _ = checkpoint.load_model(folder, _layout())
    return {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def _layout():
    from omegaconf import OmegaConf

    from pipelines.backend import distributed

    return distributed.initialize(OmegaConf.create({"tensor": 1, "pipeline": 1}))


def test_kill_9_after_a_checkpoint_resumes_bit_identically(tmp_path, tiny_teacher, tiny_data, full_cache):
    steps = {"distill.train_steps": 12, "distill.cache": full_cache}
    whole = run_script("scripts/distill.py", *distill_args(tiny_teacher, tiny_data, tmp_path / "whole", **steps))
    assert whole.returncode == 0, whole.stderr[-3000:]
    args = distill_args(tiny_teacher, tiny_data, tmp_path / "killed", **steps)
    killed_at = _kill_after_first_checkpoint(args)
    assert killed_at < 12 and not (tmp_path / "killed" / "manifest.json").exists()
    resumed = run_script("scripts/distill.py", *args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from step {killed_at} " in resumed.stdout
    a, b = final_weights(tmp_path / "whole"), final_weights(tmp_path / "killed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the metrics file has one train line per step, with no duplicates from the killed run
    lines = [json.loads(x) for x in (tmp_path / "killed" / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if x["kind"] == "train"] == list(range(1, 13))
    again = run_script("scripts/distill.py", *args)
    assert "up to date; skipping" in again.stdout


def test_a_resume_at_another_tensor_parallel_size_stops_before_loading(tmp_path, tiny_teacher, tiny_data,
                                                                       full_cache, monkeypatch):
    """The dp_reshardable optimizer state reshards over data-parallel sizes only: a checkpoint saved
    at one TP and loaded at another would fail inside megatron; it stops first, naming the layout."""
    from pipelines.training.plan import Plan
    from pipelines.training.trainer import Trainer

    cfg = compose("pipeline", distill_args(tiny_teacher, tiny_data, tmp_path / "out", **{"distill.cache": full_cache}))
    trainer = Trainer(Plan(cfg, 1), _layout())
    trainer.checkpoints.folder.mkdir(parents=True)
    trainer.train_step()
    trainer.checkpoints.save()
    assert trainer.checkpoints.load() and trainer.step == 1
    trainer.batches.close()   # the same layout resumes
    monkeypatch.setattr(trainer.checkpoints, "_model_parallel", lambda: {"tensor": 2, "pipeline": 1})
    with pytest.raises(UserError, match=r"saved at TP=1 PP=1; this run is TP=1.*reshards over data-parallel "
                       r"sizes only.*\(fix: run.stage_parallel.distill / parallel.tensor\)"):
        trainer.checkpoints.load()


def test_cache_with_full_vocabulary_equals_online_teacher(tmp_path, tiny_teacher, trained_teacher,
                                                          tiny_data, full_cache):
    from pipelines.training.plan import Plan
    from pipelines.training.trainer import Trainer

    layout = _layout()
    results = []
    for mode in ("cache", "online"):
        cfg = compose("pipeline", distill_args(tiny_teacher, tiny_data, tmp_path / mode, **{
            "distill.teacher": mode, "distill.cache": full_cache if mode == "cache" else "null",
            "distill.teacher_checkpoint": trained_teacher, "distill.temperature": 1.0}))
        trainer = Trainer(Plan(cfg, 1), layout)
        metrics = trainer.forward_backward().read()
        grads = [p.main_grad.clone() for p in trainer.model.parameters()]
        results.append((metrics, grads))
    (cache_metrics, cache_grads), (online_metrics, online_grads) = results
    assert abs(cache_metrics["loss"] - online_metrics["loss"]) <= 1e-5
    assert cache_metrics["loss"] > 0.01
    scale = max(g.abs().max().item() for g in online_grads)
    diff = max((a - b).abs().max().item() for a, b in zip(cache_grads, online_grads))
    assert diff <= 1e-5 * scale, (diff, scale)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_linear_layers_add_their_weight_gradients_into_the_ddp_buffer(tmp_path, tiny_data, full_cache, tie,
                                                                     monkeypatch):
    """Gradient-accumulation fusion: every linear layer (4 per layer and the output layer) of every
    micro-batch adds its weight gradient into the DDP buffer through the kernel, the input
    embedding its token rows (pipelines.ops.embedding), and the buffer holds what it holds without the
    fusion (a tied embedding's two gradients included)."""
    from pipelines.backend import kernels
    from pipelines.training import plan
    from pipelines.training import trainer as trainer_

    student = import_hf_llama(tmp_path, tiny_data / "tokenizer", tie=tie)
    layout = _layout()
    cfg = compose("pipeline", distill_args(student, tiny_data, tmp_path / "run", **{"distill.cache": full_cache}))
    calls = []
    kernel = kernels._TorchWeightGradient.wgrad_gemm_accum_fp32

    def counted(total_input, grad_output, main_grad):
        calls.append(main_grad.shape)
        kernel(total_input, grad_output, main_grad)

    monkeypatch.setattr(kernels._TorchWeightGradient, "wgrad_gemm_accum_fp32", staticmethod(counted))
    fused = trainer_.Trainer(plan.Plan(cfg, 1), layout)
    fused_metrics = fused.forward_backward().read()
    unfused_overrides = trainer_.training_overrides
    monkeypatch.setattr(trainer_, "training_overrides",
                        lambda *a, **k: {**unfused_overrides(*a, **k), "gradient_accumulation_fusion": False})
    plain = trainer_.Trainer(plan.Plan(cfg, 1), layout)
    plain_metrics = plain.forward_backward().read()
    assert fused.model.config.gradient_accumulation_fusion and not plain.model.config.gradient_accumulation_fusion
    layers = fused.arch["num_layers"]
    if kernels.gradient_accumulation_fusion() == "torch":   # else apex's kernel ran (a GPU node with apex)
        assert len(calls) == fused.plan.microbatches * (4 * layers + 1), len(calls)
    assert fused_metrics == plain_metrics
    named = dict(plain.model.named_parameters())
    for name, parameter in fused.model.named_parameters():
        expected = named[name].main_grad
        torch.testing.assert_close(parameter.main_grad, expected, rtol=1e-5, atol=1e-6 * expected.abs().max().item())
    assert fused.model.module.share_embeddings_and_output_weights == tie


@pytest.mark.parametrize("layout", ["parallel.tensor=1", "parallel.tensor=2", "parallel.pipeline=2"],
                         ids=["dp2", "tp2", "pp2"])
def test_two_gloo_processes_match_one_process(tmp_path, tiny_teacher, tiny_data, full_cache, layout):
    """DP=2 (each rank half the micro-batches), TP=2 (vocabulary-split KD loss) and PP=2 (the
    pipeline schedule) each reach the single-process losses."""
    steps = {"distill.train_steps": 3, "distill.cache": full_cache, "distill.save_interval": 0,
             "distill.log_interval": 1}
    one = run_script("scripts/distill.py", *distill_args(tiny_teacher, tiny_data, tmp_path / "one", **steps),
                     env={"OMP_NUM_THREADS": "1"})
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_torchrun(2, "scripts/distill.py", *distill_args(tiny_teacher, tiny_data, tmp_path / "two", **steps),
                       layout)
    assert two.returncode == 0, two.stderr[-3000:]

    def losses(folder):
        lines = [json.loads(x) for x in (folder / "train" / "metrics.jsonl").read_text().splitlines()]
        return [x["loss"] for x in lines if x["kind"] == "train"]

    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(a) == len(b) == 3
    # TP splits matmul sums over ranks, so weights differ in the last bits after an update, and
    # Adam's first steps (about lr·sign(g)) amplify that: exact for the first two steps, close after
    tolerances = [1e-5, 1e-5, 1e-3] if layout == "parallel.tensor=2" else [1e-5] * 3
    assert all(abs(x - y) <= t for x, y, t in zip(a, b, tolerances)), (a, b)


def test_overlapped_reduction_and_gather_change_nothing(tmp_path, tiny_teacher, tiny_data, full_cache):
    """DP=2 with the distributed optimizer: megatron's overlapped gradient reduce-scatter and
    parameter all-gather (distill.overlap_grad_reduce) give the same losses, validation losses and
    final weights as the synchronous ones, and the manual GC changes nothing. The validation passes
    and the saves fall right after optimizer steps, where a rank's copy of the other rank's
    parameter shard is stale until gathered (Trainer.sync_parameters): without that gather the
    validation loss and the final weights differ."""
    steps = {"distill.train_steps": 4, "distill.cache": full_cache, "distill.save_interval": 2,
             "distill.eval_interval": 3, "distill.log_interval": 1, "distill.keep_checkpoints": 3}
    runs = {}
    for name, overlap, collect in (("sync", "false", 0), ("overlap", "true", 2)):
        result = run_torchrun(2, "scripts/distill.py", *distill_args(tiny_teacher, tiny_data, tmp_path / name, **steps),
                              f"distill.overlap_grad_reduce={overlap}", f"distill.gc_interval={collect}")
        assert result.returncode == 0, result.stderr[-3000:]
        lines = [json.loads(x) for x in (tmp_path / name / "train" / "metrics.jsonl").read_text().splitlines()]
        saved = tmp_path / name / "train" / "checkpoints" / "step-000002"   # right after a step
        runs[name] = ([x["loss"] for x in lines if x["kind"] == "train"],
                      [x["val_loss"] for x in lines if x["kind"] == "eval"], final_weights(tmp_path / name),
                      {p.relative_to(saved): p.read_bytes() for p in sorted(saved.rglob("*.distcp"))})
    (loss_a, val_a, weights_a, saved_a), (loss_b, val_b, weights_b, saved_b) = runs["sync"], runs["overlap"]
    assert len(loss_a) == 4 and len(val_a) == 3 and saved_a
    assert loss_a == loss_b and val_a == val_b, (loss_a, loss_b, val_a, val_b)
    for key, value in weights_a.items():
        assert torch.equal(value, weights_b[key]), key
    assert saved_a.keys() == saved_b.keys()
    assert all(saved_a[key] == saved_b[key] for key in saved_a), "the step-2 checkpoint differs"


def test_bad_input_is_refused_before_compute(tmp_path, tiny_teacher, trained_teacher, tiny_data, full_cache):
    """What the stage runner does before any compute: the inputs (the Plan), then the checks."""
    from pipelines.stages import distill

    def refused(key, *overrides, dp=1):
        cfg = compose("pipeline", distill_args(tiny_teacher, tiny_data, tmp_path / "out",
                                              **dict(o.split("=", 1) for o in overrides)))
        with pytest.raises(UserError) as error:
            distill.STAGE.inputs(cfg)
            distill.STAGE.checks(cfg, None, {"tensor": 1, "pipeline": 1, "context": 1, "data": dp})
        assert f"(fix: {key}" in str(error.value), str(error.value)
        return str(error.value)

    assert "distill.student" in refused("distill.student", f"distill.student={tmp_path / 'nothing'}")
    refused("distill.global_batch_size", "distill.global_batch_size=7", f"distill.cache={full_cache}")
    refused("distill.global_batch_size", "distill.global_batch_size=6", f"distill.cache={full_cache}", dp=2)
    message = refused("distill.cache", f"distill.cache={full_cache}", "distill.temperature=2.0")
    assert "temperature" in message
    assert "sequence_length" in refused("distill.cache", f"distill.cache={full_cache}",
                                        "distill.sequence_length=16")
    refused("distill.kd_weight", "distill.teacher=none", "distill.kd_weight=0.5")
    other = make_hf_llama(tmp_path / "other_hf", vocab_size=400, num_hidden_layers=2)
    from pipelines.stages import import_

    import_.import_hf(import_cfg(other, tmp_path / "other"))
    message = refused("distill.teacher_checkpoint", "distill.teacher=online",
                      f"distill.teacher_checkpoint={tmp_path / 'other'}")
    assert "vocabulary" in message
    online = compose("pipeline", distill_args(tiny_teacher, tiny_data, tmp_path / "out", **{
        "distill.teacher": "online", "run.teacher": trained_teacher}))
    assert distill.STAGE.inputs(online)["teacher"] == str(Path(trained_teacher).resolve())  # the run's teacher
    cli = run_script("scripts/distill.py", *distill_args(tiny_teacher, tiny_data, tmp_path / "out",
                                                         **{"distill.global_batch_size": 7,
                                                            "distill.cache": full_cache}))
    assert cli.returncode == 2 and "error:" in cli.stderr and "Traceback" not in cli.stderr


def _children(pid: int) -> set[int]:
    return {int(c) for f in Path(f"/proc/{pid}/task").glob("*/children") for c in f.read_text().split()}


def _kill_after_first_checkpoint(args):
    """kill -9 a distill process once it has saved; the step saved. Nothing it started outlives it
    (megatron's checkpoint writer starts a manager server, which would: pipelines.backend.writer_queue)."""
    process = subprocess.Popen([sys.executable, "scripts/distill.py", *args], cwd=REPO,
                               env=child_env({"OMP_NUM_THREADS": "1"}), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    latest = [a for a in args if a.startswith("distill.output=")][0].split("=", 1)[1]
    latest = f"{latest}/train/checkpoints/latest.json"
    deadline = time.time() + 120
    while not os.path.exists(latest) and time.time() < deadline and process.poll() is None:
        time.sleep(0.02)
    children = _children(process.pid)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert children, "the distill process had started no writer process"
    deadline = time.time() + 10
    while children and time.time() < deadline:
        children = {c for c in children if Path(f"/proc/{c}").exists() and
                    Path(f"/proc/{c}/stat").read_text().split(") ")[-1][0] != "Z"}
        time.sleep(0.1)
    assert not children, f"processes {children} outlived the killed distill process"
    return json.loads(open(latest).read())["step"]


def test_changed_settings_never_throw_training_state_away(tmp_path, tiny_teacher, tiny_data, full_cache):
    """Unfinished state + a result-changing key: stop naming it, state intact. Keys that do not
    change the weights (chunk_tokens after an OOM, save_interval on requeue): resume. FORCE: the
    old state is moved aside, not deleted."""
    out = tmp_path / "run"
    args = distill_args(tiny_teacher, tiny_data, out, **{"distill.train_steps": 12, "distill.cache": full_cache})
    step = _kill_after_first_checkpoint(args)
    changed = run_script("scripts/distill.py", *args, "distill.lr=0.001")
    assert changed.returncode == 2 and "Traceback" not in changed.stderr
    assert "lr changed" in changed.stderr and "(fix: distill.lr)" in changed.stderr
    assert json.loads((out / "train" / "checkpoints" / "latest.json").read_text())["step"] == step
    resumed = run_script("scripts/distill.py", *args, "distill.chunk_tokens=7", "distill.save_interval=3")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from step {step} " in resumed.stdout
    forced = run_script("scripts/distill.py", *args, "force=true")
    assert forced.returncode == 0, forced.stderr[-3000:]
    aside = list(tmp_path.glob(".run.replaced-*"))  # hidden: never mistaken for a student by eval
    assert len(aside) == 1 and (aside[0] / "train" / "checkpoints" / "latest.json").exists()
    assert "resuming from step" not in forced.stdout


def test_every_rank_restores_its_own_random_state(tmp_path):
    """megatron saves plain values from rank 0 only; the random states are one shard per rank."""
    result = run_torchrun(2, str(REPO / "tests" / "workers" / "rng_resume.py"), str(tmp_path / "state"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    firsts = [(tmp_path / "state" / f"restored-{rank}.txt").read_text() for rank in (0, 1)]
    assert firsts[0] != firsts[1]  # each rank came back (its file) to its own state, and they differ


def test_a_corrupted_training_checkpoint_is_named_and_never_read(tmp_path, tiny_teacher, tiny_data, full_cache):
    args = distill_args(tiny_teacher, tiny_data, tmp_path / "run", **{"distill.cache": full_cache,
                                                                      "distill.keep_checkpoints": 3})
    assert run_script("scripts/distill.py", *args).returncode == 0
    (tmp_path / "run" / "manifest.json").unlink()  # as if killed after the last save
    last = tmp_path / "run" / "train" / "checkpoints" / "step-000006"
    data = next(last.glob("*.distcp"))
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    refused = run_script("scripts/distill.py", *args)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert f"{data.name} does not match its checksum" in refused.stderr and "(fix: distill.output)" in refused.stderr
    import shutil

    shutil.rmtree(last)  # what the message says to do
    resumed = run_script("scripts/distill.py", *args)
    assert resumed.returncode == 0 and "resuming from step 4 " in resumed.stdout


def test_a_cache_shard_corrupted_mid_run_stops_at_its_step_by_name(tmp_path, tiny_teacher, tiny_data, full_cache):
    """The batches are built ahead in a thread (pipelines.training.prefetch): a shard that fails its
    checksum there still stops the run with the one-line error, after the checkpoints before it."""
    import shutil

    cache = tmp_path / "cache"
    shutil.copytree(full_cache, cache)
    shard = cache / "shard-00002.bin"  # samples 32-47: read first by step 5 (0-based step 4)
    raw = bytearray(shard.read_bytes())
    raw[100] ^= 0xFF
    shard.write_bytes(bytes(raw))
    args = distill_args(tiny_teacher, tiny_data, tmp_path / "run", **{"distill.cache": cache})
    refused = run_script("scripts/distill.py", *args)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
    assert "shard-00002.bin is corrupted" in refused.stderr and "(fix: distill.cache)" in refused.stderr
    latest = json.loads((tmp_path / "run" / "train" / "checkpoints" / "latest.json").read_text())
    assert latest["step"] == 4  # steps 1-4 trained and saved (save_interval 2)
    lines = [json.loads(x) for x in (tmp_path / "run" / "train" / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in lines if x["kind"] == "train"]
    assert [x["step"] for x in train] == [1, 2, 3, 4] and all(x["data_wait_s"] >= 0 for x in train)


def test_a_step_after_validation_trains_every_module(tmp_path, tiny_data, tiny_teacher, full_cache):
    """evaluate() leaves the model in eval mode; the next step sets training mode back on every
    module (the step sets it only when it is off: not on each of ~370 modules every step)."""
    from pipelines.training.plan import Plan
    from pipelines.training.trainer import Trainer

    cfg = compose("pipeline", distill_args(tiny_teacher, tiny_data, tmp_path, **{"distill.cache": full_cache}))
    trainer = Trainer(Plan(cfg, 1), _layout())
    trainer.prepare_eval()
    trainer.evaluate()
    assert not any(m.training for m in trainer.model.modules())
    trainer.train_step()
    assert all(m.training for m in trainer.model.modules())


@pytest.mark.parametrize("mode", ["cache", "online"])
def test_a_steps_forward_and_backward_read_nothing_on_the_host(tmp_path, tiny_teacher, trained_teacher,
                                                               tiny_data, full_cache, mode, monkeypatch):
    """The forward and backward passes of a step (megatron's schedule, the teacher, the loss, the
    metrics' reduction) read nothing on the host: on a GPU the host queues them whole and first
    waits in megatron's gradient clipping, which reads the total norm once; torch's fused Adam
    reads nothing more (its unfused loop reads each parameter's step count); the metrics are read
    after the optimizer."""
    from helpers.host_reads import HostReads
    from megatron.core import utils as megatron_utils
    from megatron.core.optimizer import clip_grads

    from pipelines.backend import kernels
    from pipelines.training.plan import Plan
    from pipelines.training.trainer import Trainer

    cfg = compose("pipeline", distill_args(tiny_teacher, tiny_data, tmp_path, **{
        "distill.teacher": mode, "distill.cache": full_cache if mode == "cache" else "null",
        "distill.teacher_checkpoint": trained_teacher}))
    # megatron's fallback as imported (an earlier test in this process may have replaced it)
    monkeypatch.setattr(clip_grads, "l2_norm_impl", megatron_utils.local_multi_tensor_l2_norm)
    monkeypatch.setattr(clip_grads, "multi_tensor_scale_impl", megatron_utils.local_multi_tensor_scale)
    trainer = Trainer(Plan(cfg, 1), _layout())
    assert clip_grads.l2_norm_impl is kernels._device_l2_norm   # the trainer's clipping reads nothing per tensor
    assert clip_grads.multi_tensor_scale_impl is kernels._scale_in_place   # and scales in one fused pass
    trainer.train_step()   # the first step starts the batch reader
    with HostReads() as reads:
        pending = trainer.forward_backward()
    assert reads.reads == [], reads.reads
    with HostReads() as reads:
        trainer.optimizer.step()
    assert reads.reads == ["_local_scalar_dense"], reads.reads   # megatron's one read of the norm
    assert pending.read()["loss"] > 0
