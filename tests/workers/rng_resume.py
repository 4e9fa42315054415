"""Save every rank's random state through the trainer's checkpoint entry, scramble, restore, and
check each rank draws what it drew before (launched by torchrun).

    python -m torch.distributed.run --nproc-per-node=2 tests/workers/rng_resume.py FOLDER
"""

import os
import random
import sys

import numpy as np
import torch
from megatron.core import dist_checkpointing
from omegaconf import OmegaConf

from pipelines.backend import distributed
from pipelines.training.train_checkpoint import rng_state, set_rng_state


def draws() -> list[float]:
    return [*torch.rand(2).tolist(), float(np.random.rand()), random.random()]


def main() -> None:  # under a main guard: the checkpoint writer's helper process imports this file
    folder = sys.argv[1]
    layout = distributed.initialize(OmegaConf.create({"tensor": 1, "pipeline": 1}))
    torch.manual_seed(100 + layout.rank)
    np.random.seed(200 + layout.rank)
    random.seed(300 + layout.rank)
    if layout.is_main:
        os.makedirs(folder, exist_ok=True)
    torch.distributed.barrier()
    dist_checkpointing.save({"rng": rng_state(layout)}, folder)
    expected = draws()
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    state = dist_checkpointing.load({"rng": rng_state(layout)}, folder)
    set_rng_state(state["rng"])
    got = draws()
    assert got == expected, (layout.rank, got, expected)
    # a file per rank: two ranks' lines on one stdout pipe can interleave
    with open(os.path.join(folder, f"restored-{layout.rank}.txt"), "w") as handle:
        handle.write(f"{got[0]:.6f}\n")
    print(f"rank {layout.rank}: restored its own random state, first draw {got[0]:.6f}", flush=True)
    distributed.shutdown()


if __name__ == "__main__":
    main()
