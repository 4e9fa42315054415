"""The stages, one module each (its name the stage's), and their registry in pipeline order.

A stage is a :class:`~pipelines.stages.base.Stage` declared at the bottom of its module; the
runner (:mod:`pipelines.stages.base`) owns skipping, staging, the manifest and the runtime. The
stage scripts and the launcher find stages here by name: the name is the make target, the script
(``scripts/<name>.py``), the config section and the run folder's prefix.
"""

from __future__ import annotations

from pathlib import Path

from pipelines.core.errors import UserError
from pipelines.stages import base, correct, distill, export, import_, logits, prepare, prune, quantize, report, speed
from pipelines.stages import eval as evaluation
from pipelines.stages.base import Stage


def registry() -> dict[str, Stage]:
    """Every stage, by name, in pipeline order."""
    ordered = (prepare.STAGE, import_.STAGE, correct.STAGE, logits.STAGE, prune.STAGE, distill.STAGE,
               quantize.STAGE, evaluation.STAGE, speed.STAGE, report.STAGE, export.STAGE)
    return {stage.name: stage for stage in ordered}


def get(name: str) -> Stage:
    stages = registry()
    if name not in stages:
        raise UserError(f"unknown stage {name!r}; one of {', '.join(stages)} or pipeline", "STAGE")
    return stages[name]


def run(name: str, cfg) -> dict:
    """Run the stage called ``name`` on ``cfg`` (:func:`pipelines.stages.base.run`)."""
    return base.run(get(name), cfg)


def run_all(name: str, cfg) -> list[dict]:
    """:func:`pipelines.stages.base.run_all` for the stage called ``name``."""
    return base.run_all(get(name), cfg)


def up_to_date(name: str, cfg) -> Path | None:
    """:func:`pipelines.stages.base.up_to_date` for the stage called ``name``."""
    return base.up_to_date(get(name), cfg)
