"""The import stage: a Hugging Face Llama folder (or a random demo teacher) into an engine checkpoint.

``scripts/import.py``, ``make import``. An output folder named by hand is never replaced by
another result. The work is :func:`pipelines.hf.convert.import_checkpoint`.
"""

from __future__ import annotations

from omegaconf import OmegaConf

from pipelines.hf.convert import host_runtime, import_checkpoint, import_inputs, required_path
from pipelines.stages import base
from pipelines.stages.base import Stage

# Output folders named by hand are never replaced by another result (replaces=False).
STAGE = Stage(name="import", output=lambda cfg: required_path(cfg, "import.output"), inputs=import_inputs,
               run=import_checkpoint, runtime=host_runtime, replaces=False)


def import_hf(section, force: bool = False) -> dict:
    """The import stage on its own: ``section`` holds ``source``, ``output`` and
    ``make_vocab_size_divisible_by`` (tests, benchmarks, gpu-check)."""
    return base.run(STAGE, OmegaConf.create({"import": section, "force": force}))
