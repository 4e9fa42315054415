"""Structured pruning of a Llama checkpoint: depth (drop layers) or width (Minitron).

The prune stage (:mod:`pipelines.stages.prune`) calls these. Depth pruning drops whole transformer blocks, either the
``prune.drop_layers`` given or the contiguous block chosen by a measured criterion:
``loss`` (the validation LM-loss increase when the block is removed; Minitron's) or
``block_influence`` (ShortGPT: cosine distance between the block's input and output on
calibration data). Width pruning runs ModelOpt's ``mcore_minitron`` on calibration data to rank
hidden channels, MLP neurons and attention heads, caching the importance scores so another
target shape of the same teacher and data reuses them. ``prune=search`` searches width and depth
together for the best student within a parameter budget (:mod:`pipelines.pruning.search`).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from pipelines.core.artifacts import config_hash
from pipelines.core.errors import UserError, require
from pipelines.model import build as model_lib
from pipelines.pruning import search


def register_rmsnorm_for_modelopt() -> None:
    """Let ModelOpt prune ``torch.nn.RMSNorm`` (the local layer spec's norm without Apex/TE).

    ModelOpt 0.43 registers TE's norms only; this mirrors its ``_DynamicTENorm``.
    """
    from modelopt.torch.nas.modules.norm import _DynamicLayerNorm
    from modelopt.torch.nas.registry import DMRegistry

    if torch.nn.RMSNorm in DMRegistry:
        return

    @DMRegistry.register({torch.nn.RMSNorm: "nn.RMSNorm"})
    class _DynamicTorchRMSNorm(_DynamicLayerNorm):
        def _setup(self, *, num_features):
            self._register_hparam("num_features", num_features)
            self._register_dynamic_attribute("weight", self._cut_to_active_features)
            self._register_dynamic_attribute("normalized_shape", self._get_normalized_shape)


class _SkippedLayers:
    """Context manager: run ``model`` with the given decoder layers removed."""

    def __init__(self, model, drop: list[int]):
        self.model, self.drop = model, set(drop)

    def __enter__(self):
        self.layers = self.model.decoder.layers
        kept = [layer for number, layer in enumerate(self.layers) if number not in self.drop]
        self.model.decoder.layers = torch.nn.ModuleList(kept)
        return self.model

    def __exit__(self, *exc):
        self.model.decoder.layers = self.layers


def depth_scores(model, arch, criterion: str, drop_count: int, calib, valid) -> dict[str, float]:
    """Score of removing each contiguous block of ``drop_count`` layers (lower is better);
    ``calib()``: ``(inputs, conversation starts or None)`` batches; ``valid(model)``: its held-out loss."""
    layers = arch["num_layers"]
    starts = range(layers - drop_count + 1)
    if criterion == "loss":
        scores = {}
        for start in starts:
            with _SkippedLayers(model, list(range(start, start + drop_count))):
                scores[f"{start}-{start + drop_count - 1}"] = valid(model)
        return scores
    if criterion == "block_influence":
        hidden = {}
        hooks = [model.embedding.register_forward_hook(lambda m, i, o: hidden.__setitem__(0, o))]
        for number, layer in enumerate(model.decoder.layers):
            hooks.append(layer.register_forward_hook(
                lambda m, i, o, n=number + 1: hidden.__setitem__(n, o[0] if isinstance(o, tuple) else o)))
        sums = {start: 0.0 for start in starts}
        tokens_seen = 0
        with torch.no_grad():
            for tokens, begins in calib():
                model_lib.local_logits(model, tokens, begins)
                for start in starts:
                    cosine = F.cosine_similarity(hidden[start].float(), hidden[start + drop_count].float(), dim=-1)
                    sums[start] += (1 - cosine).sum().item()
                tokens_seen += tokens.numel()
        for hook in hooks:
            hook.remove()
        return {f"{s}-{s + drop_count - 1}": total / tokens_seen for s, total in sums.items()}
    raise UserError(f"unknown depth criterion {criterion!r} (loss, block_influence)", "prune.criterion")


def drop_layers(model, arch, drop: list[int], layout):
    """A new model without the ``drop`` layers, holding the kept layers' weights."""
    kept = [number for number in range(arch["num_layers"]) if number not in set(drop)]
    new_arch = {**arch, "num_layers": len(kept)}
    config = model_lib.transformer_config(new_arch, model.config.params_dtype, layout.tensor_parallel,
                                          layout.pipeline_parallel, layout.context_parallel, layout.device)
    pruned = model_lib.build(new_arch, config, initialize=False)
    pruned.to(next(model.parameters()).device)
    state = {}
    for name, tensor in model.state_dict().items():
        if name.startswith("decoder.layers."):
            number = int(name.split(".")[2])
            if number not in kept:
                continue
            name = name.replace(f"decoder.layers.{number}.", f"decoder.layers.{kept.index(number)}.", 1)
        state[name] = tensor
    result = pruned.load_state_dict(state, strict=False)
    require(not [k for k in result.missing_keys if not k.endswith("_extra_state")],
            f"layer drop left keys unset: {result.missing_keys[:4]}", "prune.drop_layers")
    return pruned, new_arch


def minitron(model, arch, constraints: dict, divisors: dict, calib_batches, scores_path: Path,
             search_config: dict | None = None):
    """ModelOpt's ``mcore_minitron`` under ``constraints`` (``export_config`` or ``params``), calibrated
    on ``calib_batches()``: ``(inputs, conversation starts or None)``; returns the pruned model and its arch."""
    import modelopt.torch.prune as mtp
    from modelopt.torch.prune.plugins.mcore_minitron import get_mcore_minitron_config

    register_rmsnorm_for_modelopt()
    for saved in Path(scores_path).parent.glob(Path(scores_path).stem + "*" + Path(scores_path).suffix):
        search.load_search_state(saved)   # a shared cache that could run code stops here, by name

    def forward_loop(module):
        with torch.no_grad():
            for tokens, starts in calib_batches():
                module(tokens, *model_lib.model_inputs(tokens, starts))

    pruned, _ = mtp.prune(
        model,
        mode=[("mcore_minitron", get_mcore_minitron_config(**{"num_layers_divisor": 1, **divisors}))],
        constraints=constraints,
        dummy_input=None,
        config={"forward_loop": forward_loop, "scores_path": str(scores_path), **(search_config or {})},
    )
    config = pruned.config
    new_arch = {**arch, "hidden_size": config.hidden_size, "ffn_hidden_size": config.ffn_hidden_size,
                "num_attention_heads": config.num_attention_heads, "num_layers": len(pruned.decoder.layers),
                "num_query_groups": config.num_query_groups, "kv_channels": config.kv_channels}
    return pruned, new_arch


def width_prune(model, arch, targets: dict, calib_batches, scores_path: Path):
    """ModelOpt Minitron width pruning to ``targets``; returns the pruned model and its arch."""
    sources = {"hidden_size": arch["hidden_size"], "ffn_hidden_size": arch["ffn_hidden_size"],
               "num_attention_heads": arch["num_attention_heads"]}
    export_config = {key: int(value) for key, value in targets.items() if value is not None}
    divisors = {f"{key}_divisor": math.gcd(export_config.get(key, size), size)
                for key, size in sources.items() if key != "num_attention_heads"}
    return minitron(model, arch, {"export_config": export_config}, divisors, calib_batches, scores_path)


def search_prune(cfg, model, arch, calib, valid, cache: Path, layout, tokenizer_dir: Path):
    """``prune=search`` (:mod:`pipelines.pruning.search`): the best shape within the budget; returns the
    pruned model, its arch and the report's ``target_params`` and scored ``candidates``."""
    s = cfg.prune.search
    wanted, divisors = search.budget(cfg, arch), search.divisors(arch, s)
    settings = {"score": str(s.score), "eval_samples": int(cfg.prune.eval_samples), "top_k": int(s.top_k),
                "max_width_pruning": float(s.max_width_pruning), "max_depth_pruning": float(s.max_depth_pruning),
                "hparams_to_skip": sorted(s.get("hparams_to_skip") or []), **divisors}
    if str(s.score) == "mmlu":
        settings.update(mmlu_limit=int(s.mmlu_limit), shots=int(cfg.eval.shots),
                        mmlu=OmegaConf.to_container(cfg.eval.mmlu))
    # the importance scores and every candidate's score, reused by a search with the same settings
    # (another budget reuses the importance scores)
    state = cache / f"search-{config_hash(settings)}.pth"
    print(f"[prune] search: at most {wanted:,} parameters; top {s.top_k} candidates scored by {s.score}", flush=True)
    try:
        pruned, new_arch = minitron(
            model, arch, {"params": wanted}, divisors, calib, state,
            {"score_func": search.score_function(cfg, arch, valid, layout, tokenizer_dir), "top_k": int(s.top_k),
             "max_width_pruning": float(s.max_width_pruning), "max_depth_pruning": float(s.max_depth_pruning),
             "hparams_to_skip": list(s.get("hparams_to_skip") or []) or None})
    except AssertionError as error:
        if "No subnets found" in str(error):
            raise UserError(f"ModelOpt found no shape with at most {wanted:,} parameters within the search "
                            "limits", "prune.target_params") from None
        raise
    rank_file = state.with_name(f"{state.stem}{torch.distributed.get_rank()}{state.suffix}") \
        if torch.distributed.is_initialized() else state
    scored = search.candidates(rank_file, wanted, arch, str(s.score))
    require(model_lib.exportable(new_arch), f"the search chose {search.shape_of(pruned.config)}, which transformers "
            "cannot load (no candidate was exportable)", "prune.search.hparams_to_skip")
    return pruned, new_arch, {"target_params": wanted, "candidates": scored}


