"""The correct stage: teacher correction, the distill loop on the teacher with no teacher of its own.

Minitron fine-tunes the teacher on the distillation data first, so that its soft labels fit that
data (``correct.enabled``). It is :func:`pipelines.stages.distill.training_stage` for the
``correct`` config section.
"""

from __future__ import annotations

from pipelines.stages.distill import training_stage

STAGE = training_stage("correct")
