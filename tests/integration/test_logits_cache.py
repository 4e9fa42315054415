"""The teacher-logits cache: fidelity, compact format, resume after kill -9, checksums, DP=2."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from helpers import REPO, child_env, compose, run_torchrun

from pipelines import stages
from pipelines.core.errors import UserError
from pipelines.data.corpus import TokenWindows
from pipelines.data.logits_cache import LogitsCache, pack_ids, unpack_ids
from pipelines.model import checkpoint
from pipelines.model.build import forward_logits
from pipelines.ops.kd_loss import teacher_topk


def overrides(teacher, data, output, k=8, samples=12, per_shard=3, mode="sampled"):
    return [f"logits.teacher={teacher}", f"logits.output={output}", f"data.output={data}", f"logits.mode={mode}",
            f"logits.k={k}", f"logits.samples={samples}", f"logits.samples_per_shard={per_shard}",
            "logits.sequence_length=32", "logits.batch_size=2"]


def files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.glob("shard-*"))}


def test_id_packing_round_trips_17_bits():
    ids = np.random.default_rng(0).integers(0, 128256, size=999)
    packed = pack_ids(ids, 17)
    assert packed.nbytes == int(np.ceil(999 * 17 / 8))
    assert (unpack_ids(packed, 17, 999) == ids).all()


def test_cache_holds_the_teachers_topk(tmp_path, tiny_teacher, tiny_data, cpu_runtime):
    stages.run("logits", compose("pipeline", overrides(tiny_teacher, tiny_data, tmp_path / "c", k=300, mode="topk")))
    cache = LogitsCache(tmp_path / "c")
    assert len(cache) == 12
    model, arch = checkpoint.load_model(tiny_teacher, cpu_runtime)
    sample = TokenWindows(tiny_data, "train", 32)[7]
    with torch.no_grad():
        logits = forward_logits(model.eval(), sample[None, :-1])[0, :, :300]
    ids, logprobs, tail = cache[7]
    expected_ids, expected_logprobs, _ = teacher_topk(logits, 300)
    full = torch.full((32, 300), float("nan"))
    full.scatter_(-1, ids, logprobs)
    reference = torch.full((32, 300), float("nan"))
    reference.scatter_(-1, expected_ids, expected_logprobs)
    assert (full - reference).abs().max().item() <= 0.01  # float16 storage
    assert torch.isinf(tail).all()  # k = vocabulary: no tail mass


def test_kill_resume_is_byte_identical_and_skips_when_done(tmp_path, tiny_teacher, tiny_data, capsys):
    args = overrides(tiny_teacher, tiny_data, tmp_path / "whole", samples=24, per_shard=2)
    stages.run("logits", compose("pipeline", args))
    resumed = tmp_path / "resumed"
    command = [sys.executable, "scripts/logits.py",
               *overrides(tiny_teacher, tiny_data, resumed, samples=24, per_shard=2)]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True, env=child_env())
    deadline = time.time() + 180
    while not list(resumed.glob("shard-00002.sha256")) and time.time() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, "the stage exited before it could be killed"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    finished = len(list(resumed.glob("*.sha256")))
    assert 0 < finished < 12 and not (resumed / "manifest.json").exists()
    stages.run("logits", compose("pipeline", overrides(tiny_teacher, tiny_data, resumed,
                                                           samples=24, per_shard=2)))
    assert files(resumed) == files(tmp_path / "whole")
    stages.run("logits", compose("pipeline", overrides(tiny_teacher, tiny_data, resumed,
                                                           samples=24, per_shard=2)))
    assert "up to date" in capsys.readouterr().out


def test_corrupted_shard_and_mismatched_run_are_named(tmp_path, tiny_teacher, tiny_data):
    stages.run("logits", compose("pipeline", overrides(tiny_teacher, tiny_data, tmp_path / "c")))
    with pytest.raises(UserError, match="made for k=8, this run has 16"):
        LogitsCache(tmp_path / "c", expected_identity={"k": 16})
    shard = tmp_path / "c" / "shard-00001.bin"
    raw = bytearray(shard.read_bytes())
    raw[10] ^= 0xFF
    shard.write_bytes(bytes(raw))
    cache = LogitsCache(tmp_path / "c")
    cache[0]  # shard 0 is intact
    with pytest.raises(UserError, match="shard-00001.bin is corrupted"):
        cache[4]


def test_two_data_parallel_ranks_write_the_same_cache(tmp_path, tiny_teacher, tiny_data):
    stages.run("logits", compose("pipeline", overrides(tiny_teacher, tiny_data, tmp_path / "one")))
    result = run_torchrun(2, "scripts/logits.py",
                          *overrides(tiny_teacher, tiny_data, tmp_path / "two"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert files(tmp_path / "two") == files(tmp_path / "one")


@pytest.mark.parametrize("bits", [3, 8, 10, 17, 24, 31, 32])
@pytest.mark.parametrize("count", [1, 7, 8, 999])
def test_fast_packing_matches_the_bit_plane_layout(bits, count):
    from pipelines.data.logits_cache import pack_planes

    ids = np.random.default_rng(bits * count).integers(0, 2**bits, size=count, dtype=np.uint64)
    packed = pack_ids(ids, bits)
    assert np.array_equal(packed, pack_planes(ids, bits))
    assert np.array_equal(unpack_ids(packed, bits, count), ids.astype(np.int64))


def test_shards_of_other_settings_are_never_mixed_in(tmp_path, tiny_teacher, tiny_data, cpu_runtime):
    output = tmp_path / "c"
    stages.run("logits", compose("pipeline", overrides(tiny_teacher, tiny_data, output, k=8)))
    (output / "manifest.json").unlink()          # as if killed before finishing
    (output / "shard-00003.bin").unlink()
    stages.run("logits", compose("pipeline", overrides(tiny_teacher, tiny_data, output, k=4)))
    assert LogitsCache(output).manifest["k"] == 4 and all(
        LogitsCache(output)[i][0].shape[-1] == 4 for i in range(12))
    forced = stages.run("logits", compose("pipeline", overrides(tiny_teacher, tiny_data, output, k=4)
                                        + ["force=true"]))
    assert forced["k"] == 4


def test_more_samples_keep_the_full_shards_and_recompute_the_partial_one(tmp_path, tiny_teacher, tiny_data,
                                                                         cpu_runtime):
    """10 samples in shards of 4 ([0,4) [4,8) [8,10)), then 14: the two full shards are kept, the
    partial one is recomputed as [8,12), and every shard equals a fresh 14-sample run's."""
    grown = tmp_path / "grown"
    stages.run("logits", compose("pipeline", overrides(tiny_teacher, tiny_data, grown, samples=10, per_shard=4)))
    kept = {name: (grown / name).stat().st_mtime_ns for name in ("shard-00000.bin", "shard-00001.bin")}
    assert (grown / "shard-00002.sha256").read_text().split()[1:] == ["8", "10"]
    stages.run("logits", compose("pipeline", overrides(tiny_teacher, tiny_data, grown, samples=14, per_shard=4)))
    assert {name: (grown / name).stat().st_mtime_ns for name in kept} == kept
    assert (grown / "shard-00002.sha256").read_text().split()[1:] == ["8", "12"]
    fresh = tmp_path / "fresh"
    stages.run("logits", compose("pipeline", overrides(tiny_teacher, tiny_data, fresh, samples=14, per_shard=4)))
    assert files(grown) == files(fresh) and len(LogitsCache(grown)) == 14


def test_distill_refuses_a_cache_smaller_than_it_reads(tmp_path, tiny_teacher, tiny_data, cpu_runtime):
    from pipelines.training.plan import Plan

    cache = tmp_path / "cache"
    stages.run("logits", compose("pipeline", overrides(tiny_teacher, tiny_data, cache, samples=12)))
    cfg = compose("pipeline", [f"distill.student={tiny_teacher}", f"distill.output={tmp_path / 'out'}",
                              f"data.output={tiny_data}", f"distill.cache={cache}", "distill.sequence_length=32",
                              "distill.global_batch_size=8", "distill.micro_batch_size=2", "distill.train_steps=2",
                              "distill.warmup_steps=1"])
    with pytest.raises(UserError, match=r"holds 12 samples and this run reads up to 16.*fix: logits.samples"):
        Plan(cfg, 1)


def test_another_run_with_the_same_teacher_content_reuses_the_shards(tmp_path, tiny_teacher, tiny_data, capsys):
    """A teacher imported again from the same Hugging Face folder, into another run, is the same
    teacher: its run links the first run's shards instead of recomputing them."""
    from helpers import import_cfg

    from pipelines.stages import import_

    again = tmp_path / "other" / "teacher"
    import_.import_hf(import_cfg(tiny_teacher.parent / "random_hf", again))
    assert checkpoint.content_id(again) == checkpoint.content_id(tiny_teacher)
    runs = tmp_path / "runs"
    first, second = runs / "a" / "logits", runs / "b" / "logits"
    stages.run("logits", compose("pipeline", overrides(tiny_teacher, tiny_data, first)
                               + [f"logits.reuse_from={runs}"]))
    capsys.readouterr()
    manifest = stages.run("logits", compose("pipeline", overrides(again, tiny_data, second)
                                          + [f"logits.reuse_from={runs}"]))
    assert "reusing 4 shards" in capsys.readouterr().out
    assert files(second) == files(first)
    assert (second / "shard-00000.bin").stat().st_ino == (first / "shard-00000.bin").stat().st_ino
    assert manifest["teacher_path"] == str(again.resolve())
    other = stages.run("logits", compose("pipeline", overrides(again, tiny_data, runs / "c" / "logits", k=4)
                                       + [f"logits.reuse_from={runs}"]))
    assert other["k"] == 4 and "reusing" not in capsys.readouterr().out  # other settings: computed
