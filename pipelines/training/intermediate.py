"""Hidden-state distillation (``distill.intermediate``): losses between chosen layers' outputs.

Each entry pairs a student layer with a teacher layer, ``{student: <layer>, teacher: <layer>,
loss: cosine | mse, weight: <w>}``, layers numbered from 0. The states are the after-block hidden
states (a decoder layer's output, the residual stream), ``[s, b, h]``. Each term,
``weight · D(student, teacher)`` averaged over the tokens, is added to the KD and CE mix:

- ``cosine``: ``1 − cos(h_s, h_t)`` per token;
- ``mse``: the squared difference, averaged over tokens and the hidden dimension.

``teacher: null`` is the layer a depth-pruned student's layer came from (the prune stage's
``report.removed.layers``). It needs the teacher online (``distill.teacher=online``): caching hidden
states would cost about 2·hidden bytes per token per layer against the logits cache's ~266, so
with the cache it is refused. Student and teacher widths must be equal (no projection is
learned), and the pipeline-parallel size 1 (a pair may not cross stages).

With a loss mask (conversations, ``data.chat.loss_on=assistant``) a term counts the tokens the
logit losses count: the state at a position is the one that predicts that position's label. It
is the masked sum divided by the same normalizer as KD and CE (the global batch's counted tokens'
share), so the terms weigh tokens as the logit losses do.

Under tensor parallelism without sequence parallelism (CPU, the local spec) every rank holds the
whole hidden state and computes the same term, which megatron's collectives turn into the gradient
of one copy. With sequence parallelism (the TE spec on GPUs) the states are split over the sequence:
each rank's term covers its tokens (unmasked: divided by the tensor-parallel size; masked: its
slice of the mask over the whole count), so the ranks' terms add up to the mean over all tokens;
that path runs only on GPUs and is not tested here beyond the slicing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from pipelines.core.artifacts import read_manifest
from pipelines.core.errors import require
from pipelines.ops.kd_loss import counted_weights

LOSSES = ("cosine", "mse")
KEYS = ("student", "teacher", "loss", "weight")


@dataclass(frozen=True)
class Pair:
    student: int
    teacher: int
    loss: str
    weight: float


def check_config(d, section: str, pipeline: int) -> None:
    """What the config alone decides (before the checkpoints exist): kinds, names, the teacher."""
    entries = d.get("intermediate") or []
    key = f"{section}.intermediate"
    require(not isinstance(entries, (str, int, float)) and hasattr(entries, "__len__") and not hasattr(entries, "keys"),
            f"{key}={entries!r} must be a list of {{student, teacher, loss, weight}}", key)
    if not entries:
        return
    require(str(d.teacher) == "online", f"{key} needs the teacher online ({section}.teacher=online): caching "
            "hidden states would cost about 2 x hidden bytes per token per layer", key)
    require(int(pipeline) == 1, f"{key} pairs layers within one pipeline stage: run it with parallel.pipeline=1",
            key)
    for number, entry in enumerate(entries):
        where = f"{key}[{number}]"
        require(hasattr(entry, "keys"), f"{where}={entry!r} must be a mapping {{student, teacher, loss, weight}}", key)
        unknown = sorted(set(entry.keys()) - set(KEYS))
        require(not unknown, f"{where} has unknown keys {unknown}; its keys are {', '.join(KEYS)}", key)
        for name in ("student", "teacher"):
            value = entry.get(name)
            if name == "teacher" and value is None:
                continue
            require(isinstance(value, int) and not isinstance(value, bool) and value >= 0,
                    f"{where}.{name}={value!r} must be a layer number (from 0)", key)
        require(str(entry.get("loss", "cosine")) in LOSSES, f"{where}.loss={entry.get('loss')!r}: one of "
                f"{', '.join(LOSSES)}", key)
        weight = entry.get("weight", 1.0)
        require(isinstance(weight, (int, float)) and not isinstance(weight, bool) and 0 < float(weight) < float("inf"),
                f"{where}.weight={weight!r} must be a number above 0", key)


def source_layers(student: Path) -> list[int] | None:
    """The teacher layer each layer of a depth-pruned student came from (None: not pruned by depth)."""
    manifest = read_manifest(student) or {}
    report = manifest.get("report") or {}
    removed = (report.get("removed") or {}).get("layers")
    before = (report.get("config_before") or {}).get("num_layers")
    if removed is None or before is None:
        return None
    return [layer for layer in range(int(before)) if layer not in set(removed)]


def pairs(d, section: str, student: Path, student_arch: dict, teacher_arch: dict) -> list[Pair]:
    """The configured pairs, checked against both architectures."""
    key = f"{section}.intermediate"
    found = []
    for number, entry in enumerate(d.get("intermediate") or []):
        where = f"{key}[{number}]"
        s = int(entry["student"])
        require(s < int(student_arch["num_layers"]), f"{where}.student={s}: the student has "
                f"{student_arch['num_layers']} layers (0 to {int(student_arch['num_layers']) - 1})", key)
        t = entry.get("teacher")
        if t is None:
            sources = source_layers(student)
            require(sources is not None, f"{where}.teacher is null, which maps a depth-pruned student's layer to "
                    f"the teacher layer it came from, and {student} was not pruned by depth: name the layer", key)
            t = sources[s]
        require(int(t) < int(teacher_arch["num_layers"]), f"{where}.teacher={t}: the teacher has "
                f"{teacher_arch['num_layers']} layers", key)
        found.append(Pair(s, int(t), str(entry.get("loss", "cosine")), float(entry.get("weight", 1.0))))
    if found:
        require(int(student_arch["hidden_size"]) == int(teacher_arch["hidden_size"]),
                f"student width {student_arch['hidden_size']} != teacher width {teacher_arch['hidden_size']}: "
                "hidden-state losses compare states of one width (no projection is learned)", key)
    return found


def token_distance(student: torch.Tensor, teacher: torch.Tensor, loss: str) -> torch.Tensor:
    """The per-token distance between ``[..., h]`` hidden states, ``[...]`` (float32),
    differentiable in ``student``."""
    s, t = student.float(), teacher.detach().float()
    if loss == "cosine":
        return 1.0 - F.cosine_similarity(s, t, dim=-1)
    return (s - t).pow(2).mean(-1)


def pair_loss(student: torch.Tensor, teacher: torch.Tensor, loss: str) -> torch.Tensor:
    """Mean over tokens of :func:`token_distance`."""
    return token_distance(student, teacher, loss).mean()


class HiddenStates:
    """Forward hooks that keep the outputs of some decoder layers, for one forward pass at a time."""

    def __init__(self, model, layers: list[int]):
        self.states: dict[int, torch.Tensor] = {}
        self.handles = [model.decoder.layers[layer].register_forward_hook(self._keep(layer))
                        for layer in sorted(set(layers))]

    def _keep(self, layer: int):
        def hook(module, args, output):
            self.states[layer] = output[0] if isinstance(output, tuple) else output
        return hook

    def take(self) -> dict[int, torch.Tensor]:
        states, self.states = self.states, {}
        return states


def token_weights(loss_mask: torch.Tensor, normalizer: torch.Tensor | float | None,
                  sequence_parallel_size: int = 1, sequence_parallel_rank: int = 0) -> torch.Tensor:
    """``[s_local, b]`` weights for states ``[s, b, h]`` from a ``[b, s]`` loss mask: the logit
    losses' weights (:func:`~pipelines.ops.kd_loss.counted_weights`: the mask over ``normalizer``,
    default the whole mask's count), this sequence-parallel rank's rows."""
    rows = counted_weights(loss_mask, normalizer).t()
    local = rows.shape[0] // sequence_parallel_size
    return rows[sequence_parallel_rank * local:(sequence_parallel_rank + 1) * local]


def hidden_loss(pairs_: list[Pair], student: dict, teacher: dict, sequence_parallel_size: int = 1,
                loss_mask: torch.Tensor | None = None, normalizer: torch.Tensor | float | None = None,
                sequence_parallel_rank: int = 0) -> torch.Tensor:
    """The weighted sum of the pairs' terms (see the module doc): unmasked, each a mean over this
    rank's tokens divided by the sequence-parallel size; masked, the weighted sum by
    :func:`token_weights`."""
    if loss_mask is None:
        total = sum(p.weight * pair_loss(student[p.student], teacher[p.teacher], p.loss) for p in pairs_)
        return total / sequence_parallel_size
    weights = token_weights(loss_mask, normalizer, sequence_parallel_size, sequence_parallel_rank)
    return sum(p.weight * (token_distance(student[p.student], teacher[p.teacher], p.loss) * weights).sum()
               for p in pairs_)
