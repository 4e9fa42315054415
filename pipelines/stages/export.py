"""The export stage: each distilled student as a Hugging Face Llama folder (``make export``).

``scripts/export.py``. An output folder named by hand that holds another result is refused; one
made from the same student is replaced. The work is :func:`pipelines.hf.convert.export_checkpoint`.
"""

from __future__ import annotations

from omegaconf import OmegaConf

from pipelines.hf.convert import export_checkpoint, export_inputs, host_runtime, required_path
from pipelines.stages import base
from pipelines.stages.base import Stage

STAGE = Stage(name="export", output=lambda cfg: required_path(cfg, "export.output"), inputs=export_inputs,
               run=export_checkpoint, runtime=host_runtime, replaces=False, per_student=True,
               origin=lambda cfg: required_path(cfg, "export.source"))


def export_hf(section, force: bool = False) -> dict:
    """The export stage on its own: ``section`` holds ``source``, ``output`` and ``max_shard_bytes``."""
    return base.run(STAGE, OmegaConf.create({"export": section, "force": force}))
