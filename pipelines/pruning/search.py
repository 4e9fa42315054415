"""``prune=search``: a student by parameter budget, width and depth searched together.

ModelOpt's Minitron searcher (``mcore_minitron`` with a ``params`` constraint) ranks hidden
channels, MLP neurons, heads and layers on calibration data, as width pruning does. It then
grid-searches homogeneous shapes: for each searched hyper-parameter the largest
``1 - max_{width,depth}_pruning`` share of its choices (multiples of a step, see
:func:`divisors`). Of the shapes within ``prune.target_params`` it keeps the ``top_k`` largest
and scores each (here: the validation loss on ``prune.eval_samples`` held-out sequences, or an
MMLU slice), then prunes to the best. Depth is pruned by ModelOpt's layer ranking, so the
dropped layers need not be contiguous.

Only shapes transformers can load are chosen: :func:`divisors` keeps the hidden size a multiple
of the head count, and a candidate that is not (heads searched too) scores ``-inf``.

Before any compute, :func:`grid` enumerates the same shapes and :func:`counted` counts them as
ModelOpt does (with the padded vocabulary, so a student's Hugging Face count is never above the
budget), so the experiment check refuses a budget no shape meets and plans with the largest
shape within it.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from pipelines.core.errors import UserError, require
from pipelines.evaluation.scoring import choose, mmlu_requests
from pipelines.model import build as model_lib
from pipelines.model import checkpoint
from pipelines.pruning.targets import MEMORY_FORMATS, memory_bytes

SCORES = ("val_loss", "mmlu")                        # prune.search.score
SEARCHABLE = ("hidden_size", "ffn_hidden_size", "num_attention_heads", "num_layers")


def counted(arch: dict) -> int:
    """Parameters as ModelOpt counts them against the budget: with the padded vocabulary
    (``model.make_vocab_size_divisible_by``), so never fewer than Hugging Face counts."""
    return model_lib.count_parameters({**arch, "vocab_size": model_lib.padded_vocab_size(arch)})


def budget(cfg, teacher: dict) -> int | None:
    """``prune.target_params`` in parameters: a fraction (≤ 1) of the Hugging Face count of
    ``prune.budget_of`` (the run's teacher in later rounds of ``run.rounds``; by default the
    pruned ``teacher`` itself) or a count; shapes are held to it as :func:`counted` counts them.
    None when unset (a latency or memory target then bounds the search)."""
    if cfg.prune.get("target_params") is None:
        return None
    value = float(cfg.prune.target_params)
    require(value > 0, f"prune.target_params={value} must be above 0", "prune.target_params")
    total = model_lib.count_parameters(teacher)
    whole = model_lib.count_parameters(budget_base(cfg, teacher))
    wanted = int(value * whole) if value <= 1 else int(value)
    require(wanted < total, f"prune.target_params={value} is {wanted:,} parameters, not below the "
            f"{total:,} of the model it prunes", "prune.target_params")
    return wanted


def budget_base(cfg, teacher: dict) -> dict:
    """The architecture a fractional budget is a fraction of: ``prune.budget_of``'s checkpoint,
    ``model.*`` while that checkpoint is still to be made (the experiment check), or ``teacher``."""
    of = cfg.prune.get("budget_of")
    if not of:
        return teacher

    folder = Path(str(of))
    if (folder / "model.yaml").exists():
        return checkpoint.read_architecture(folder, "prune.budget_of")[0]
    return model_lib.architecture(cfg.model)


def divisors(teacher: dict, search) -> dict:
    """The step of each width choice: the hidden size's is a multiple of the head count (near
    hidden/16), so every hidden choice exports; the MLP's is the largest power of two ≤ ffn/16."""
    hidden = search.get("hidden_size_divisor")
    if hidden is None:
        heads = teacher["num_attention_heads"]
        hidden = heads * max(1, round(teacher["hidden_size"] / 16 / heads))
    ffn = search.get("ffn_hidden_size_divisor")
    if ffn is None:
        ffn = 2 ** max(0, int(math.log2(max(1, teacher["ffn_hidden_size"] // 16))))
    return {"hidden_size_divisor": int(hidden), "ffn_hidden_size_divisor": int(ffn),
            "num_layers_divisor": int(search.get("num_layers_divisor") or 1)}


def _choices(size: int, step: int) -> list[int]:
    """ModelOpt's choices of a hyper-parameter of ``size`` with ``step``: its multiples, and itself."""
    return sorted({k * step for k in range(1, size // step + 1)} | {size})


def grid(teacher: dict, search) -> list[dict]:
    """Every shape the searcher considers (before the budget), as ModelOpt builds its grid."""
    from itertools import product

    steps = divisors(teacher, search)
    space = {"hidden_size": _choices(teacher["hidden_size"], steps["hidden_size_divisor"]),
             "ffn_hidden_size": _choices(teacher["ffn_hidden_size"], steps["ffn_hidden_size_divisor"]),
             "num_attention_heads": [h * teacher["num_query_groups"] for h in
                                     range(1, teacher["num_attention_heads"] // teacher["num_query_groups"] + 1)],
             "num_layers": _choices(teacher["num_layers"], steps["num_layers_divisor"])}
    skip = set(search.get("hparams_to_skip") or [])
    filtered = {}
    for key, values in space.items():
        if key in skip or len(values) < 2:
            continue
        share = float(search.max_depth_pruning if key == "num_layers" else search.max_width_pruning)
        filtered[key] = sorted(values)[int((1 - share) * len(values)):]
    keys = list(filtered)
    return [{**teacher, **dict(zip(keys, values))} for values in product(*(filtered[k] for k in keys))]


def within_budget(cfg, teacher: dict) -> list[dict]:
    """The shapes of :func:`grid` within the parameter budget and the memory target, largest
    first; stops naming the key when none. (The latency target is timed by the prune stage.)"""
    check_settings(cfg)
    wanted = budget(cfg, teacher)
    unpruned = {k: teacher[k] for k in SEARCHABLE}
    shapes = [s for s in grid(teacher, cfg.prune.search)
              if model_lib.exportable(s) and {k: s[k] for k in SEARCHABLE} != unpruned]
    limits = f"prune.search.max_width_pruning={cfg.prune.search.max_width_pruning} and " \
             f"max_depth_pruning={cfg.prune.search.max_depth_pruning}"
    if wanted is not None:
        fitting = [s for s in shapes if counted(s) <= wanted]
        if not fitting:
            smallest = min(counted(s) for s in shapes)
            raise UserError(f"no shape within {limits} has at most {wanted:,} parameters (the smallest has "
                            f"{smallest:,}); raise the budget or those limits (or prune in rounds)",
                            "prune.target_params")
        shapes = fitting
    memory_gb = cfg.prune.get("target_memory_gb")
    if memory_gb is not None:
        sizes = [memory_bytes(s, cfg.prune.memory, int4_group(cfg, s)) / 1e9 for s in shapes]
        fitting = [s for s, size in zip(shapes, sizes) if size <= float(memory_gb)]
        require(fitting, f"no shape within {limits}{' and the parameter budget' if wanted else ''} fits "
                f"{float(memory_gb)} GB in {cfg.prune.memory.format} with a {cfg.prune.memory.context}-token KV "
                f"cache (the smallest needs {min(sizes):.3f} GB); raise it or the search limits",
                "prune.target_memory_gb")
        shapes = fitting
    return sorted(shapes, key=counted, reverse=True)


def int4_group(cfg, shape: dict) -> int | None:
    """The INT4 block of ``shape`` as ``make quantize`` would pick it, for int4 memory targets."""
    if str(cfg.prune.memory.format) != "int4":
        return None
    from pipelines.quantization.ptq import group_size

    return group_size(cfg.quantize.group_size, shape)


def latency_target(cfg) -> bool:
    """Whether the search has a latency target (``prune.target_latency`` or ``prune.latency.reference``)."""
    return cfg.prune.get("target_latency") is not None or bool(cfg.prune.latency.get("reference"))


def reference_shape(cfg, teacher: dict) -> dict | None:
    """``prune.latency.reference``: the source with those architecture keys changed, or None."""
    changes = cfg.prune.latency.get("reference")
    if not changes:
        return None
    from omegaconf import OmegaConf

    changes = OmegaConf.to_container(changes) if not isinstance(changes, dict) else changes
    require(isinstance(changes, dict) and set(changes) <= set(SEARCHABLE) and all(
        isinstance(v, int) and 0 < v <= teacher[k] for k, v in changes.items()),
        f"prune.latency.reference={changes} must change some of {SEARCHABLE} to whole numbers within the source's",
        "prune.latency.reference")
    require(cfg.prune.get("target_latency") is None, "prune.latency.reference and prune.target_latency both set: "
            "the reference's timing is the target", "prune.latency.reference")
    return {**teacher, **changes}


def ranking_recompute(cfg) -> str:
    """The ranking runs' activation recompute: ``prune.search.distill_recompute``, else ``distill.recompute``."""
    return str(cfg.prune.search.get("distill_recompute") or cfg.distill.recompute)


def ranked(cfg) -> bool:
    """Whether ``prune=search`` picks among candidates as ordinary runs (a latency or memory target,
    or ranking by a short distillation) rather than inside ModelOpt's params-only searcher."""
    return cfg.prune.mode == "search" and (latency_target(cfg)
                                           or cfg.prune.get("target_memory_gb") is not None
                                           or int(cfg.prune.search.get("distill_steps") or 0) > 0)


def check_ranked(cfg, teacher: dict, layout: dict | None) -> list[dict]:
    """The rules of a :func:`ranked` search before compute; returns the shapes within the parameter
    and memory limits (largest first) whose layers split over ``layout``'s pipeline stages."""
    shapes = within_budget(cfg, teacher)
    prune, s = cfg.prune, cfg.prune.search
    stages = int(layout["pipeline"]) if layout is not None else 1
    if stages > 1:   # each candidate is pruned and distilled with the prune stage's layout
        shapes = [x for x in shapes if x["num_layers"] % stages == 0]
        require(shapes, f"no shape within the targets has a layer count divisible by the prune stage's pipeline "
                f"size {stages}; set prune.search.num_layers_divisor={stages}", "prune.search.num_layers_divisor")
    if latency_target(cfg):
        reference_shape(cfg, teacher)
        speed = cfg.eval.speed
        require(str(speed.backend) == "transformers", f"a latency target is timed through transformers, and "
                f"eval.speed.backend={speed.backend} is refused here", "prune.target_latency")
    else:   # without timing the candidates are known now
        require(int(s.top_k) <= len(shapes), f"prune.search.top_k={s.top_k} is more than the {len(shapes)} "
                "shapes within the targets", "prune.search.top_k")
    if int(s.distill_steps) > 0:
        d = cfg.distill
        require(str(d.teacher) in ("cache", "online"), f"ranking by a short distillation needs a teacher: "
                f"distill.teacher={d.teacher}", "prune.search.distill_steps")
        require(str(s.score) == "val_loss", "ranking by a short distillation compares held-out losses: "
                "prune.search.score must be val_loss", "prune.search.score")
    return shapes


def check_settings(cfg) -> None:
    """The ranges of ``prune.search``'s keys, and ``prune.target_params``'s sign."""
    search = cfg.prune.search
    require(cfg.prune.get("target_params") is not None or ranked(cfg), "prune=search needs a target: "
            "prune.target_params, prune.target_latency or prune.target_memory_gb", "prune.target_params")
    for key in ("target_latency", "target_memory_gb"):
        if cfg.prune.get(key) is not None:
            require(float(cfg.prune[key]) > 0, f"prune.{key}={cfg.prune[key]} must be above 0", f"prune.{key}")
    require(str(cfg.prune.memory.format) in MEMORY_FORMATS, f"prune.memory.format={cfg.prune.memory.format} "
            f"is not one of {MEMORY_FORMATS}", "prune.memory.format")
    for section, keys in (("memory", ("context", "batch")),
                          ("latency", ("batch", "context", "decode_tokens", "repeats", "whole_limit", "check_shapes"))):
        for key in keys:
            value = cfg.prune[section][key]
            require(isinstance(value, int) and value >= 1, f"prune.{section}.{key}={value} must be a whole number, "
                    "at least 1", f"prune.{section}.{key}")
    require(float(cfg.prune.latency.max_error) > 0, f"prune.latency.max_error={cfg.prune.latency.max_error} must be "
            "above 0", "prune.latency.max_error")
    recompute = search.get("distill_recompute")
    require(recompute is None or str(recompute) in ("none", "selective", "full"), f"prune.search.distill_recompute="
            f"{recompute} is not none, selective or full (or null: distill.recompute)", "prune.search.distill_recompute")
    steps = search.get("distill_steps") or 0
    require(isinstance(steps, int) and steps >= 0, f"prune.search.distill_steps={steps} must be a whole number, "
            "0 or more", "prune.search.distill_steps")
    require(str(search.score) in SCORES, f"unknown prune.search.score {search.score!r}; one of {SCORES}",
            "prune.search.score")
    require(int(search.top_k) >= 1, f"prune.search.top_k={search.top_k} must be at least 1", "prune.search.top_k")
    for key in ("max_width_pruning", "max_depth_pruning"):
        require(0 <= float(search[key]) < 1, f"prune.search.{key}={search[key]} must be in [0, 1)",
                f"prune.search.{key}")
    for key in ("hidden_size_divisor", "ffn_hidden_size_divisor", "num_layers_divisor", "mmlu_limit"):
        if search.get(key) is not None:
            require(int(search[key]) >= 1, f"prune.search.{key}={search[key]} must be at least 1",
                    f"prune.search.{key}")
    unknown = sorted(set(search.get("hparams_to_skip") or []) - set(SEARCHABLE))
    require(not unknown, f"prune.search.hparams_to_skip names {unknown}; searchable: {SEARCHABLE}",
            "prune.search.hparams_to_skip")


def check(layout: dict) -> None:
    """The layout rule of ``prune=search`` (its settings and budget are checked by
    :func:`within_budget`, which plans the student)."""
    require(int(layout["tensor"]) == 1, "the parameter search needs tensor parallel size 1 (a ModelOpt limit "
            "of Minitron pruning); use pipeline parallelism for it", "run.stage_parallel.prune")


def shape_of(config) -> dict:
    """The searched hyper-parameters of a (dynamic) megatron model's current shape."""
    return {"hidden_size": int(config.hidden_size), "ffn_hidden_size": int(config.ffn_hidden_size),
            "num_attention_heads": int(config.num_attention_heads), "num_layers": int(config.num_layers)}


def score_function(cfg, arch: dict, valid, layout, tokenizer_dir: Path):
    """ModelOpt's ``score_func`` (higher is better) for the shape a candidate model has now:
    minus the validation loss (``valid(model)``), or the accuracy on an MMLU slice; ``-inf`` when not exportable."""
    search = cfg.prune.search
    requests = None
    if str(search.score) == "mmlu":
        from omegaconf import OmegaConf


        slice_cfg = OmegaConf.create({"shots": int(cfg.eval.shots), "limit": int(search.mmlu_limit),
                                      "mmlu": OmegaConf.to_container(cfg.eval.mmlu)})
        questions, requests, _ = mmlu_requests(slice_cfg, tokenizer_dir, int(cfg.eval.max_length))
        answers = [q.answer for q in questions]

    def score(model) -> float:
        shape = {**arch, **shape_of(model.config)}
        if not model_lib.exportable(shape):
            return float("-inf")
        if requests is None:
            return -valid(model)

        picks = choose(model, requests, int(cfg.eval.batch_tokens), arch["vocab_size"], layout)
        return sum(p == a for p, a in zip(picks, answers)) / len(answers)

    return score


def load_search_state(path: Path) -> dict:
    """ModelOpt's pruning state (importance scores, scored candidates) read so that it cannot run
    code: tensors, plain containers and ModelOpt's ``CandidateSubnet`` only. A shared score cache
    holding anything else is refused, before ModelOpt (which reads it with ``weights_only=False``)."""
    import pickle

    from modelopt.torch.prune.plugins.mcore_minitron import CandidateSubnet

    try:
        with torch.serialization.safe_globals([CandidateSubnet]):
            return torch.load(path, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError) as error:
        first = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise UserError(f"the pruning score cache {path} holds more than scores and candidates ({first}); it is "
                        "not read: remove it to recompute the scores, or point at a cache this pipeline wrote",
                        "prune.scores_cache") from None


def candidates(state_file: Path, wanted: int, arch: dict, score: str) -> list[dict]:
    """The scored candidates ModelOpt kept in its search state (``top_k`` largest within budget)."""
    state = load_search_state(state_file)
    kept = state["top_k_candidates_per_constraint"][float(wanted)]
    best = max(kept, key=lambda c: c.score)
    rows = []
    for candidate in kept:
        shape = {**arch, **candidate.ss_config}
        value = candidate.score
        rows.append({"architecture": {k: shape[k] for k in SEARCHABLE}, "params": model_lib.count_parameters(shape),
                     "params_modelopt": int(candidate.params), "exportable": model_lib.exportable(shape),
                     "score": score, score: (-value if score == "val_loss" else value)
                     if math.isfinite(value) else None, "chosen": candidate is best})
    return rows
