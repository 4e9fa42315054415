"""What every stage script shares: quiet library noise, one-line user errors.

    @hydra.main(config_path="../configs", config_name="pipeline", version_base="1.3")
    def main(cfg):
        run_stage("prune", cfg)
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from typing import Any, Callable

from pipelines import stages
from pipelines.core.errors import UserError
from pipelines.training import preemption

# Messages megatron-core, ModelOpt and torch print on every CPU run; they are expected there.
KNOWN_NOISE = (
    r".*Transformer Engine and Apex are not installed.*",
    r".*Apex is not installed.*",
    r".*full scope is deprecated.*",
    r".*deprecating ShardedTensor.*",
    r".*`load_state_dict` is deprecated.*",
    r".*all_gather_into_tensor.*is deprecated.*",
    r".*_reduce_scatter_base.*is deprecated.*",
    r".*Unknown file type: assumed RDS.*",
)


def quiet_known_noise() -> None:
    """Hide the known, harmless library warnings and INFO logs (not errors)."""
    for pattern in KNOWN_NOISE:
        warnings.filterwarnings("ignore", message=pattern)
    for name in ("megatron", "modelopt", "torch.distributed", "c10d-NullHandler-dcp_logger"):
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def run_cli(function: Callable[[Any], Any], cfg: Any) -> Any:
    """Call ``function(cfg)``; report a :class:`UserError` as one line and exit with status 2."""
    quiet_known_noise()
    try:
        return function(cfg)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)


def run_stage(name: str, cfg) -> Any:
    """A stage script's body: run the stage ``name`` (:func:`pipelines.stages.run_all`) on ``cfg``;
    SLURM's USR1 makes it exit 75 for requeue (:func:`pipelines.training.preemption.install_default`).
    ``CUDA_DEVICE_MAX_CONNECTIONS=1`` (unless set) before CUDA starts, as Megatron-LM requires for
    tensor parallelism on Hopper."""
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    preemption.install_default()
    return run_cli(lambda c: stages.run_all(name, c), cfg)
