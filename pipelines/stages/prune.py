"""The prune stage: the teacher into one student per ``run.students`` entry (``make prune``).

``scripts/prune.py``. Depth, width or a searched shape (``prune.mode``), by the methods of
:mod:`pipelines.pruning`; the student is written as a normal checkpoint with its report.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from omegaconf import OmegaConf

from pipelines.core.artifacts import config_hash, read_manifest, write_json
from pipelines.data.corpus import TokenWindows, check_tokenized_for
from pipelines.model import build as model_lib
from pipelines.model import checkpoint
from pipelines.pruning.methods import depth_scores, drop_layers, search_prune, width_prune
from pipelines.pruning import search
from pipelines.stages import candidates, distill, rules
from pipelines.stages.base import Stage


def prune_inputs(cfg) -> dict:
    source = Path(str(cfg.prune.source))
    checkpoint.read_architecture(source, "prune.source")
    found = {"source": read_manifest(source).get("written_at"), "source_path": str(source.resolve()),
             "prune": config_hash(OmegaConf.to_container(cfg.prune)),
             "data": str(cfg.data.output), "calib_samples": int(cfg.prune.calib_samples)}
    if search.ranked(cfg) and int(cfg.prune.search.distill_steps) > 0:   # the ranking runs' settings and cache
        settings = {k: v for k, v in OmegaConf.to_container(cfg.distill, resolve=True).items()
                    if k not in ("student", "output", "cache")}
        cache = read_manifest(Path(str(cfg.distill.cache))) if str(cfg.distill.teacher) == "cache" else None
        found["ranking"] = {"distill": config_hash(settings), "cache": (cache or {}).get("written_at")}
    return found


def calibration_cache(cfg, inputs: dict) -> Path:
    """The importance scores' folder: ``prune.scores_cache``, or one keyed by teacher and data beside the output."""
    calibration = config_hash({"teacher": inputs["source"], "path": inputs["source_path"], "data": inputs["data"],
                               "calib_samples": inputs["calib_samples"],
                               "sequence_length": int(cfg.prune.sequence_length)})
    output = Path(str(cfg.prune.output))
    return Path(str(cfg.prune.scores_cache)) if cfg.prune.scores_cache else output.parent / f".minitron_scores-{calibration}"


def checks(cfg, arch, layout) -> dict:
    """Every rule of the prune section (:func:`pipelines.stages.rules.prune_rules`), and the
    calibration data's tokenizer against the source's."""
    check_tokenized_for(Path(str(cfg.data.output)), Path(str(cfg.prune.source)), arch["vocab_size"], "data.tokenizer")
    return rules.prune_rules(cfg, arch, layout)


def run(cfg, layout, staging: Path, inputs: dict) -> dict:
    """Prune ``prune.source`` into ``staging``; returns the manifest's fields (with the report)."""
    if search.ranked(cfg):   # candidates as ordinary runs (pipelines.stages.candidates)
        return candidates.run(cfg, layout, staging, calibration_cache(cfg, inputs), STAGE, distill.STAGE)
    source, output = Path(str(cfg.prune.source)), Path(str(cfg.prune.output))
    arch, _ = checkpoint.read_architecture(source, "prune.source")
    sequence_length = int(cfg.prune.sequence_length)
    calib_data = TokenWindows(Path(str(cfg.data.output)), "train", sequence_length)
    valid_data = TokenWindows(Path(str(cfg.data.output)), "valid", sequence_length)
    batch_size = int(cfg.prune.batch_size)

    def calib():  # (inputs, conversation starts or None) on the model's device
        return ((layout.place(t), starts) for t, starts in calib_data.input_batches(batch_size, int(cfg.prune.calib_samples)))

    def valid(model) -> float:   # the loss on prune.eval_samples held-out sequences (the loss mask's tokens)
        return model_lib.windows_loss(model, valid_data, batch_size, int(cfg.prune.eval_samples), arch["vocab_size"],
                                      layout.place)

    started = time.perf_counter()
    dtype = layout.compute_dtype
    purpose = "train" if cfg.prune.mode == "depth" else "modelopt"
    model, arch = checkpoint.load_model(source, layout, dtype=dtype, purpose=purpose)
    model.eval()
    teacher_loss = valid(model)
    report = {"mode": cfg.prune.mode, "source": str(source), "config_before": arch,
              "params_before": model_lib.count_parameters(arch), "val_loss_teacher": teacher_loss}
    if cfg.prune.mode == "depth":
        drop = sorted(int(n) for n in cfg.prune.drop_layers or [])
        if not drop:
            count = arch["num_layers"] - int(cfg.prune.target_num_layers)
            scores = depth_scores(model, arch, cfg.prune.criterion, count, calib, valid)
            best = min(scores, key=scores.get)
            first, last = (int(n) for n in best.split("-"))
            drop = list(range(first, last + 1))
            report.update(criterion=cfg.prune.criterion, importance=scores)
            print(f"[prune] {cfg.prune.criterion} score of removing each block of {count} layers:")
            for block, score in scores.items():
                print(f"  layers {block:>7}: {score:.4f}{'  <- chosen' if block == best else ''}")
        pruned, new_arch = drop_layers(model, arch, drop, layout)
        report["removed"] = {"layers": drop}
    else:
        cache = calibration_cache(cfg, inputs)
        if cfg.prune.mode == "search":
            pruned, new_arch, found = search_prune(cfg, model, arch, calib, valid, cache, layout, source / "tokenizer")
            report.update(found)
            print(f"[prune] search: {len(found['candidates'])} candidates scored by {cfg.prune.search.score}:")
            for row in found["candidates"]:
                print(f"  {row['architecture']} {row['params']:,} parameters: {row[str(cfg.prune.search.score)]}"
                      f"{'  <- chosen' if row['chosen'] else ''}")
        else:
            # ModelOpt writes one scores<rank>.pth per rank into this folder.
            pruned, new_arch = width_prune(model, arch, dict(cfg.prune.target), calib, cache / "scores.pth")
        report["removed"] = {key: arch[key] - new_arch[key] for key in
                             ("hidden_size", "ffn_hidden_size", "num_attention_heads", "num_layers")}
        report["importance"] = {"scores_cache": str(cache)}
    pruned.eval()
    report.update(config_after=new_arch, params_after=model_lib.count_parameters(new_arch),
                  val_loss_pruned=valid(pruned),
                  seconds=time.perf_counter() - started)
    checkpoint.save_weights(pruned, staging)
    fields = {"report": report, "config": new_arch, "parameters": report["params_after"]}
    if layout.is_main:
        checkpoint.write_architecture(staging, new_arch, dtype)
        shutil.copytree(source / "tokenizer", staging / "tokenizer")
        write_json(staging / "prune_report.json", report)
        fields["content"] = checkpoint.content_digest(staging)
    print(f"[prune] {cfg.prune.mode}: parameters {report['params_before']:,} -> {report['params_after']:,}; "
          f"val loss teacher {teacher_loss:.4f}, pruned {report['val_loss_pruned']:.4f}; {output}")
    return fields


STAGE = Stage(name="prune", output=lambda cfg: Path(str(cfg.prune.output)), inputs=prune_inputs, run=run,
              checks=checks, source=lambda cfg: Path(str(cfg.prune.source)),
              per_student=True, distributed=True, model_parallel_only=True)
