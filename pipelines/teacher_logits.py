"""The teacher-logits stage: run the teacher once over the distillation samples and cache its
top-k soft labels (``scripts/teacher_logits.py``; format in :mod:`pipelines.logits_cache`).

Samples are the train split's :class:`~pipelines.data.TokenWindows` in order, the order distill
reads. Shard ``i`` is computed by data-parallel rank ``i % dp``; tensor-parallel ranks compute
together and their first rank writes. Finished shards are skipped on a rerun.

Memory: the teacher's logits stay split over tensor-parallel ranks and in the model's dtype; the
top-k runs on ``logits.chunk_tokens`` tokens at a time in float32, per rank, and merges the k·tp
candidates (:func:`pipelines.kd_loss.teacher_topk`). Where the teacher fits on one GPU (8B in
bf16 does), run this stage data-parallel (``run.stage_parallel.logits: {tensor: 1}``): every
GPU writes its own shards and no top-k is repeated.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path

import torch

from pipelines import checkpoint, preemption, runtime, validate
from pipelines.artifacts import read_manifest, sha256_file, write_json
from pipelines.data import TokenWindows
from pipelines.errors import require
from pipelines.kd_loss import teacher_sampled, teacher_topk
from pipelines.logits_cache import Layout, finalize, finished_shards, shard_name, write_shard
from pipelines.model import local_logits


def cache_identity(teacher: Path, data: Path, sequence_length: int, k: int, temperature: float,
                   mode: str = "topk", value_dtype: str = "float16", samples_per_shard: int | None = None,
                   seed: int | None = None) -> dict:
    """What a cache is valid for, by content: distill compares its own run against this, and
    another run with the same identity lends its shards (:func:`_reuse`).

    The teacher is its content digest (:func:`pipelines.checkpoint.content_id`), the data its
    manifest's inputs (corpus hashes and tokenizer settings): no path, so a teacher imported
    again from the same Hugging Face folder, in another run folder, is the same teacher. Every
    setting that changes a shard's bytes is here (``seed`` only for sampled labels, where it
    decides the draws). The number of samples is not: a larger ``logits.samples`` keeps the full
    shards and computes the rest (each shard records its range, see
    :func:`pipelines.logits_cache.finished_shards`).
    """
    tokenizer = teacher / "tokenizer" / "tokenizer.json"
    data_manifest = read_manifest(data) or {}
    return {"teacher": checkpoint.content_id(teacher), "data_inputs": data_manifest.get("inputs"),
            "sequence_length": sequence_length, "k": k, "temperature": temperature, "mode": mode,
            "value_dtype": value_dtype, "samples_per_shard": samples_per_shard,
            "seed": seed if mode == "sampled" else None,
            "tokenizer": sha256_file(tokenizer) if tokenizer.exists() else None}


def _reuse(output: Path, identity: dict, samples: int, per_shard: int, search: Path | None) -> int:
    """Link the finished shards of another run's cache with this ``identity`` into ``output``.

    Caches under ``search`` (``logits.reuse_from``: the runs folder) are candidates; the one that
    holds the most of this run's shards lends them as hard links (copies across filesystems).
    Returns the number of shards linked (main rank, before computing)."""
    if search is None or not search.is_dir():
        return 0
    best, best_shards = None, set()
    for manifest_path in search.glob("*/*/manifest.json"):
        donor = manifest_path.parent
        if donor.resolve() == output.resolve():
            continue
        manifest = read_manifest(donor) or {}
        if manifest.get("stage") != "teacher_logits" or manifest.get("identity") != identity:
            continue
        shards = finished_shards(donor, samples, per_shard) - finished_shards(output, samples, per_shard)
        if len(shards) > len(best_shards):
            best, best_shards = donor, shards
    for index in sorted(best_shards):
        for name in (shard_name(index), f"shard-{index:05d}.sha256"):
            target = output / name
            target.unlink(missing_ok=True)
            try:
                os.link(best / name, target)
            except OSError:
                shutil.copy2(best / name, target)
    if best_shards:
        print(f"[teacher_logits] reusing {len(best_shards)} shards of {best} (same teacher content, data "
              "and settings)", flush=True)
    return len(best_shards)


def _start(folder: Path, identity: dict, force: bool) -> None:
    """Make ``folder`` hold only shards of this ``identity`` (main rank; others wait after).

    ``identity.json`` is written before the first shard, so shards left by a killed run with
    other settings (teacher, data, k, temperature, ...) are removed rather than mixed in.
    """
    stamp = folder / "identity.json"
    (folder / "manifest.json").unlink(missing_ok=True)  # running: the cache is not finished until finalize
    stale = force or (stamp.exists() and json.loads(stamp.read_text()) != identity)
    if stale or not stamp.exists():
        for path in list(folder.glob("shard-*")) + list(folder.glob(".shard-*")):
            path.unlink(missing_ok=True)
    write_json(stamp, identity)


def run(cfg) -> dict:
    from megatron.core import parallel_state

    logits_cfg = cfg.logits
    teacher, output = Path(str(logits_cfg.teacher)), Path(str(logits_cfg.output))
    data = Path(str(cfg.data.output))
    sequence_length, k = int(logits_cfg.sequence_length), int(logits_cfg.k)
    temperature = float(logits_cfg.temperature)
    arch, _ = checkpoint.read_architecture(teacher, "logits.teacher")
    validate.section_ranges(cfg, "logits", arch)  # the rules the experiment check applies
    mode = str(logits_cfg.mode)
    value_dtype = str(logits_cfg.get("value_dtype", "float16"))
    per_shard = int(logits_cfg.samples_per_shard)
    identity = cache_identity(teacher, data, sequence_length, k, temperature, mode, value_dtype, per_shard,
                              int(logits_cfg.seed))
    windows = TokenWindows(data, "train", sequence_length)
    samples = min(len(windows), int(logits_cfg.samples or len(windows)))
    done = read_manifest(output) if output.exists() else None
    if (done and done.get("identity") == identity and done.get("samples") == samples
            and not cfg.get("force", False)):
        print(f"[teacher_logits] {output} is up to date; skipping (force=true recomputes)")
        return done
    layout = runtime.initialize(cfg.parallel)
    require(layout.pipeline_parallel == 1, "the teacher-logits stage runs with pipeline parallel "
            "size 1", "parallel.pipeline")
    model, arch = checkpoint.load_model(teacher, layout, dtype=layout.compute_dtype)
    model.eval()
    preemption.install()
    if layout.is_main:
        output.mkdir(parents=True, exist_ok=True)
        _start(output, identity, bool(cfg.get("force", False)))
        if not cfg.get("force", False):
            search = logits_cfg.get("reuse_from")
            _reuse(output, identity, samples, per_shard, Path(str(search)) if search else None)
    torch.distributed.barrier()
    cache_layout = Layout(sequence_length, k, arch["vocab_size"], value_dtype)
    shards = math.ceil(samples / per_shard)
    dp_rank = parallel_state.get_data_parallel_rank()
    writer = parallel_state.get_tensor_model_parallel_rank() == 0
    # top-k per vocabulary slice, chunked (see the module doc)
    split = dict(vocab_size=arch["vocab_size"], tp_group=parallel_state.get_tensor_model_parallel_group(),
                 chunk_tokens=int(logits_cfg.chunk_tokens))
    finished = finished_shards(output, samples, per_shard)
    todo = [i for i in range(shards) if i % layout.data_parallel == dp_rank and i not in finished]
    started, tokens = time.perf_counter(), 0
    batch_size = int(logits_cfg.batch_size)
    for number, shard in enumerate(todo):
        encoded = []
        indices = list(range(shard * per_shard, min((shard + 1) * per_shard, samples)))
        generator = torch.Generator(device=layout.device).manual_seed(int(logits_cfg.seed) + shard)
        for first in range(0, len(indices), batch_size):
            batch = layout.place(torch.stack([windows[i] for i in indices[first:first + batch_size]]))
            with torch.no_grad():
                logits = local_logits(model, batch[:, :-1])  # this rank's vocabulary slice
                ids, logprobs, tail = (teacher_topk(logits, k, temperature, **split) if mode == "topk" else
                                       teacher_sampled(logits, k, temperature, generator, **split))
                del logits
            ids, logprobs, tail = ids.cpu(), logprobs.cpu(), tail.cpu()
            encoded += [cache_layout.encode(ids[j], logprobs[j], tail[j]) for j in range(len(batch))]
            tokens += batch[:, :-1].numel()
        if writer:
            write_shard(output, shard, encoded, first=shard * per_shard)
        rate = tokens / (time.perf_counter() - started)
        print(f"[teacher_logits] rank {layout.rank}: shard {shard} done ({number + 1}/{len(todo)}), "
              f"{rate:,.0f} tokens/s", flush=True)
        if preemption.requested(collective=False) and number + 1 < len(todo):
            print(f"[teacher_logits] rank {layout.rank}: preempted; finished shards are kept", flush=True)
            preemption.leave_for_requeue()
    torch.distributed.barrier()
    manifest = finalize(output, identity, cache_layout, samples, per_shard,
                        teacher_path=str(teacher.resolve())) if layout.is_main else {}
    if layout.is_main:
        print(f"[teacher_logits] {output}: {samples} samples x {sequence_length} tokens, k={k}, "
              f"{cache_layout.sample_bytes / sequence_length:.1f} bytes/token")
    return manifest
