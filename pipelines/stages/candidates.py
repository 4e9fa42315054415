"""``prune=search`` by deployment targets, its candidates ranked by a short distillation.

With ``prune.target_latency``, ``prune.target_memory_gb`` or ``prune.search.distill_steps`` the
prune stage picks among candidates itself (ModelOpt's searcher in 0.43 constrains parameters
only):

1. the shapes of ModelOpt's grid (:func:`pipelines.pruning.search.grid`) within the parameter
   budget and the memory target, then those whose decode latency, timed on this device
   (:mod:`pipelines.pruning.targets`), meets the latency target; the ``top_k`` largest are the
   candidates;
2. each candidate is an ordinary width-prune run (ModelOpt's Minitron to that shape, depth by its
   layer ranking; the importance scores computed once, shared) in
   ``prune.candidates/<shape>/prune``, reporting its loss right after pruning;
3. with ``distill_steps``, each is then an ordinary distill run of that many steps (the
   ``distill.*`` settings, the run's one logits cache: no teacher pass) in
   ``prune.candidates/<shape>/distill``;
4. the lowest held-out loss (after the short distillation, else after pruning) is the student:
   its pruned checkpoint becomes the stage's output, and the report lists every candidate.

The candidate runs skip and resume like every stage, so a stage killed half-way redoes only the
unfinished candidate. The latency timings are kept there too, so a rerun ranks the same shapes.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from omegaconf import OmegaConf, open_dict

from pipelines.core.artifacts import read_manifest, write_json
from pipelines.core.errors import require
from pipelines.evaluation.speed import kv_cache_bytes
from pipelines.model import build as model_lib
from pipelines.model import checkpoint
from pipelines.pruning import search, targets
from pipelines.stages import base

MARKER = ".prune-candidates"   # written into a candidates folder this stage created


def cache_ready(cfg) -> None:
    """The logits cache the ranking runs read must exist before the prune stage distills."""
    if int(cfg.prune.search.distill_steps) > 0 and str(cfg.distill.teacher) == "cache":
        cache = Path(str(cfg.distill.cache))
        require(read_manifest(cache) is not None, f"ranking by a short distillation reads the teacher-logits cache "
                f"{cache}, which is not written yet: run make logits first (make pipeline runs it before prune), "
                "or set distill.teacher=online", "prune.search.distill_steps")


def folder(cfg) -> Path:
    """``prune.candidates``, created by this stage (a folder it did not create is refused)."""
    path = Path(str(cfg.prune.candidates))
    if path.exists() and any(path.iterdir()):
        require((path / MARKER).exists(), f"{path} holds files this pipeline did not write; the candidate runs "
                "are not put there: point prune.candidates at a new folder", "prune.candidates")
    path.mkdir(parents=True, exist_ok=True)
    (path / MARKER).touch()
    return path


def _with(cfg, updates: dict):
    """A copy of ``cfg`` with dotted ``updates`` set (keys may be new)."""
    copy = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    with open_dict(copy):
        for key, value in updates.items():
            OmegaConf.update(copy, key, value, merge=False, force_add=True)
    return copy


def prune_config(cfg, shape: dict, output: Path, scores: Path):
    return _with(cfg, {"prune.mode": "width", "prune.output": str(output), "prune.scores_cache": str(scores),
                       "prune.target": {k: int(shape[k]) for k in search.SEARCHABLE}})


def distill_config(cfg, student: Path, output: Path):
    d, steps = cfg.distill, int(cfg.prune.search.distill_steps)
    return _with(cfg, {"distill.student": str(student), "distill.output": str(output), "distill.train_steps": steps,
                       "distill.warmup_steps": min(int(d.warmup_steps), max(0, steps - 1)),
                       "distill.eval_interval": 0, "distill.save_interval": min(steps, int(d.save_interval) or steps),
                       "distill.keep_final_checkpoint": False,
                       "distill.recompute": search.ranking_recompute(cfg)})


def one_timing(timing, layout):
    """``timing()`` on the main process only (one device times each shape), its result sent to every rank."""
    import torch

    found = [timing() if layout.is_main else None]
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.broadcast_object_list(found, src=0)
    return found[0]


def run(cfg, layout, staging: Path, scores: Path, prune_stage, distill_stage) -> dict:
    """Choose the student among the candidates (see the module); returns the prune manifest's fields."""
    source = Path(str(cfg.prune.source))
    teacher, _ = checkpoint.read_architecture(source, "prune.source")
    shapes = search.check_ranked(cfg, teacher, base.layout_sizes(layout))
    cache_ready(cfg)
    place = folder(cfg)
    prune, s = cfg.prune, cfg.prune.search
    latency, target_ms = None, prune.get("target_latency")
    if search.latency_target(cfg):
        reference = search.reference_shape(cfg, teacher)
        latency = one_timing(lambda: targets.latencies(shapes, prune.latency, layout, place, reference=reference),
                             layout)
        targets.check_part_model(latency, float(prune.latency.max_error))
        key = "prune.target_latency" if reference is None else "prune.latency.reference"
        target_ms = float(target_ms) if reference is None else latency["reference_ms"]
        meeting = [x for x in shapes if latency["ms"][targets.shape_name(x)] <= target_ms]
        fastest = min(latency["ms"].values())
        outside = "" if reference is None or targets.shape_name(reference) in {targets.shape_name(x) for x in shapes} \
            else f"; the reference {targets.shape_name(reference)} itself is outside the limits " \
                 f"(prune.search.max_width_pruning, max_depth_pruning)"
        require(meeting, f"no shape within the limits decodes in {target_ms:.3f} ms (the fastest: {fastest:.3f} ms "
                f"on {latency['device']}){outside}; raise {key} or the search limits", key)
        require(int(s.top_k) <= len(meeting), f"prune.search.top_k={s.top_k} is more than the {len(meeting)} shapes "
                f"that decode in {target_ms:.3f} ms ({key})", "prune.search.top_k")
        shapes = meeting
    chosen_shapes = shapes[:int(s.top_k)]
    steps = int(s.distill_steps)
    print(f"[prune] search: {len(shapes)} shapes meet the targets; the {len(chosen_shapes)} largest are candidates, "
          f"ranked by {'a ' + str(steps) + '-step distillation' if steps else 'the loss after pruning'} "
          f"({place})", flush=True)
    rows = []
    for number, shape in enumerate(chosen_shapes, 1):
        name = targets.shape_name(shape)
        print(f"[prune] candidate {number}/{len(chosen_shapes)}: {name}", flush=True)
        pruned = base.run(prune_stage, prune_config(cfg, shape, place / name / "prune", scores))
        row = {"name": name, "architecture": {k: int(shape[k]) for k in search.SEARCHABLE},
               "params": model_lib.count_parameters(shape), "pruned": str(place / name / "prune"),
               "val_loss_pruned": pruned["report"]["val_loss_pruned"],
               "memory_bytes": targets.memory_bytes(shape, prune.memory, search.int4_group(cfg, shape)),
               "memory_format": str(prune.memory.format)}
        if latency is not None:
            row.update(latency_ms=latency["ms"][name], latency_method=latency["method"])
        if steps:
            distilled = base.run(distill_stage, distill_config(cfg, place / name / "prune", place / name / "distill"))
            row.update(val_loss_distilled=distilled["final"]["val_loss"], distill_tokens=distilled["tokens"])
        rows.append(row)
    by = "val_loss_distilled" if steps else "val_loss_pruned"
    best = min(rows, key=lambda r: r[by])
    after_prune_best = min(rows, key=lambda r: r["val_loss_pruned"])
    for row in rows:
        row["chosen"] = row is best
        row["chosen_after_pruning"] = row is after_prune_best
    for row in rows:
        print(f"  {row['name']} {row['params']:,} parameters"
              + (f", {row['latency_ms']:.3f} ms" if latency else "")
              + f", {row['memory_bytes'] / 1e9:.3f} GB, loss after pruning {row['val_loss_pruned']:.4f}"
              + (f", after {steps} steps {row['val_loss_distilled']:.4f}" if steps else "")
              + ("  <- chosen" if row["chosen"] else ""), flush=True)
    chosen_folder = Path(best["pruned"])
    chosen_report = read_manifest(chosen_folder)["report"]
    arch, dtype = checkpoint.read_architecture(chosen_folder, "prune.candidates")
    report = {"mode": "search", "source": str(source), "config_before": teacher,
              "params_before": model_lib.count_parameters(teacher),
              "val_loss_teacher": chosen_report["val_loss_teacher"], "config_after": arch,
              "params_after": model_lib.count_parameters(arch), "val_loss_pruned": best["val_loss_pruned"],
              "removed": {k: teacher[k] - arch[k] for k in search.SEARCHABLE},
              "importance": {"scores_cache": str(scores)}, "ranked_by": by, "candidates": rows,
              "targets": {"params": search.budget(cfg, teacher), "latency_ms": target_ms,
                          "latency_reference": OmegaConf.to_container(prune.latency.reference)
                          if prune.latency.get("reference") else None,
                          "memory_gb": prune.get("target_memory_gb")},
              "latency": None if latency is None else {k: latency[k] for k in ("method", "device", "settings",
                                                                                 "check", "max_error")},
              "memory": {"format": str(prune.memory.format), "context": int(prune.memory.context),
                         "batch": int(prune.memory.batch),
                         "kv_cache_bytes": kv_cache_bytes(arch, int(prune.memory.context), int(prune.memory.batch), 2)}}
    fields = {"report": report, "config": arch, "parameters": report["params_after"]}
    if layout.is_main:
        for part in ("weights", "tokenizer"):
            shutil.copytree(chosen_folder / part, staging / part)
        checkpoint.write_architecture(staging, arch, dtype)
        write_json(staging / "prune_report.json", report)
        fields["content"] = checkpoint.content_digest(staging)
    print(f"[prune] search: chose {best['name']} ({best['params']:,} parameters) by {by}; "
          f"{Path(str(cfg.prune.output))}", flush=True)
    return fields
