"""The logits stage: run the teacher once over the distillation samples and cache its top-k soft
labels (``scripts/logits.py``; the format is in :mod:`pipelines.data.logits_cache`).

Samples are the train split's :class:`~pipelines.data.corpus.TokenWindows` in order, the order distill
reads. Shard ``i`` is computed by data-parallel rank ``i % dp``; tensor-parallel ranks compute
together and their first rank writes. Finished shards are skipped on a rerun.

Memory: the teacher's logits stay split over tensor-parallel ranks and in the model's dtype; the
top-k runs on ``logits.chunk_tokens`` tokens at a time in float32, per rank, and merges the k·tp
candidates (:func:`pipelines.ops.kd_loss.teacher_topk`). Where the teacher fits on one GPU (8B in
bf16 does), run this stage data-parallel (``run.stage_parallel.logits: {tensor: 1}``): every
GPU writes its own shards and no top-k is repeated.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from pathlib import Path

import torch

from pipelines.core.artifacts import read_manifest, sha256_file
from pipelines.core.errors import require
from pipelines.data.corpus import TokenWindows, check_tokenized_for
from pipelines.data.logits_cache import CACHE_STAGES, Layout, cache_manifest, finished_shards, shard_name, write_shard
from pipelines.model import checkpoint
from pipelines.model.build import local_logits
from pipelines.ops.kd_loss import teacher_sampled, teacher_topk
from pipelines.stages import rules
from pipelines.stages.base import Resume, Stage
from pipelines.training import preemption


def cache_identity(teacher: Path, data: Path, sequence_length: int, k: int, temperature: float,
                   mode: str = "topk", value_dtype: str = "float16", samples_per_shard: int | None = None,
                   seed: int | None = None) -> dict:
    """What a cache is valid for, by content: distill compares its own run against this, and
    another run with the same identity lends its shards (:func:`_reuse`).

    The teacher is its content digest (:func:`pipelines.model.checkpoint.content_id`), the data its
    manifest's inputs (corpus hashes and tokenizer settings): no path, so a teacher imported
    again from the same Hugging Face folder, in another run folder, is the same teacher. Every
    setting that changes a shard's bytes is here (``seed`` only for sampled labels, where it
    decides the draws). The number of samples is not: a larger ``logits.samples`` keeps the full
    shards and computes the rest (each shard records its range, see
    :func:`pipelines.data.logits_cache.finished_shards`).
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
        if manifest.get("stage") not in CACHE_STAGES or manifest.get("identity") != identity:
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
        print(f"[logits] reusing {len(best_shards)} shards of {best} (same teacher content, data "
              "and settings)", flush=True)
    return len(best_shards)


def _settings(cfg) -> tuple:
    c = cfg.logits
    return (Path(str(c.teacher)), Path(str(cfg.data.output)), int(c.sequence_length), int(c.k),
            float(c.temperature), str(c.mode), str(c.value_dtype), int(c.samples_per_shard), int(c.seed))


def logits_inputs(cfg) -> dict:
    """The cache's identity (:func:`cache_identity`) and the samples it holds."""
    teacher, data, sequence_length, *rest = _settings(cfg)
    checkpoint.read_architecture(teacher, "logits.teacher")
    windows = TokenWindows(data, "train", sequence_length)
    samples = min(len(windows), int(cfg.logits.samples or len(windows)))
    return {**cache_identity(teacher, data, sequence_length, *rest), "samples": samples}


def checks(cfg, arch, layout) -> None:
    rules.section_ranges(cfg, "logits", arch)
    check_tokenized_for(Path(str(cfg.data.output)), Path(str(cfg.logits.teacher)), arch["vocab_size"], "data.tokenizer")
    if layout is not None:
        require(int(layout["pipeline"]) == 1, "the teacher-logits stage runs with pipeline parallel size 1",
                "run.stage_parallel.logits / parallel.pipeline")


def run(cfg, layout, output: Path, inputs: dict) -> dict:
    """Fill ``output`` with the shards this rank owns and has not finished; the manifest's fields."""
    from megatron.core import parallel_state

    logits_cfg = cfg.logits
    teacher, data, sequence_length, k, temperature, mode, value_dtype, per_shard, seed = _settings(cfg)
    identity = {key: value for key, value in inputs.items() if key != "samples"}
    samples = inputs["samples"]
    windows = TokenWindows(data, "train", sequence_length)
    model, arch = checkpoint.load_model(teacher, layout, dtype=layout.compute_dtype)
    model.eval()
    preemption.install()
    if layout.is_main and not cfg.get("force", False):
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
        generator = torch.Generator(device=layout.device).manual_seed(seed + shard)
        for first in range(0, len(indices), batch_size):
            chunk = indices[first:first + batch_size]
            batch = layout.place(torch.stack([windows[i] for i in chunk]))
            starts = windows.stacked_starts(chunk)
            with torch.no_grad():
                logits = local_logits(model, batch[:, :-1], starts)  # this rank's vocabulary slice
                ids, logprobs, tail = (teacher_topk(logits, k, temperature, **split) if mode == "topk" else
                                       teacher_sampled(logits, k, temperature, generator, **split))
                del logits
            ids, logprobs, tail = ids.cpu(), logprobs.cpu(), tail.cpu()
            for j, index in enumerate(indices[first:first + batch_size]):
                if windows.masked:   # conversations: the labels the loss counts, no others
                    where = windows.loss_mask(index).bool()
                    encoded.append(cache_layout.encode(ids[j][where], logprobs[j][where], tail[j][where]))
                else:
                    encoded.append(cache_layout.encode(ids[j], logprobs[j], tail[j]))
            tokens += batch[:, :-1].numel()
        if writer:
            write_shard(output, shard, encoded, first=shard * per_shard)
        rate = tokens / (time.perf_counter() - started)
        print(f"[logits] rank {layout.rank}: shard {shard} done ({number + 1}/{len(todo)}), "
              f"{rate:,.0f} tokens/s", flush=True)
        if preemption.requested(collective=False) and number + 1 < len(todo):
            print(f"[logits] rank {layout.rank}: preempted; finished shards are kept", flush=True)
            preemption.leave_for_requeue()
    torch.distributed.barrier()
    if not layout.is_main:
        return {}
    facts = {"teacher_path": str(teacher.resolve())}
    if windows.masked:
        facts.update(masked=True, loss_tokens=int(windows.mask_counts(samples).sum()))
    fields = cache_manifest(output, identity, cache_layout, samples, per_shard, **facts)
    stored = sum((output / name).stat().st_size for name in fields["shards"])
    fields["bytes_per_token"] = stored / (samples * sequence_length)
    print(f"[logits] {output}: {samples} samples x {sequence_length} tokens, k={k}, "
          f"{fields['bytes_per_token']:.1f} bytes/token"
          + (f" (labels of the {100 * facts['loss_tokens'] / (samples * sequence_length):.1f}% of tokens the loss "
             f"counts; {cache_layout.sample_bytes / sequence_length:.1f} for every token)" if windows.masked else ""))
    return fields


# The cache is resumable: finished shards survive a crash or a requeue; a cache stamped with another
# identity is cleared (shards are recomputable), and more samples keep the shards already done.
STAGE = Stage(name="logits", output=lambda cfg: Path(str(cfg.logits.output)), inputs=logits_inputs, run=run,
              checks=checks, source=lambda cfg: Path(str(cfg.logits.teacher)), distributed=True,
              resume=Resume(on_change="restart", grows=("samples",), stamp="identity.json"))
