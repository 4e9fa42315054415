"""Training checkpoints of the distill and correct stages (megatron's ``dist_checkpointing``).

Layout under ``<output>/train/checkpoints/``::

    step-NNNNNN/         model, optimizer (reshardable over data-parallel sizes; saved and loaded
                         fully parallel over the data-parallel ranks), scheduler, step
                         (= data position), every rank's random state, and checksums.json (the
                         sha256 of each file, computed by all ranks, checked before a load)
    latest.json          name and step of the newest complete checkpoint

A checkpoint is written to ``.step-NNNNNN.incomplete`` and renamed, then ``latest`` is switched,
so the last good checkpoint is never overwritten; the newest ``keep`` are kept. A corrupted file
is refused by name, and a checkpoint removed by hand falls back to the newest one left.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from pipelines.backend import kernels
from pipelines.core.artifacts import fsync_folder, replace_folder, sha256_file, write_json
from pipelines.core.errors import require

CHECKSUMS = "checksums.json"  # a training checkpoint's files and their sha256

# megatron-core 0.16's default distributed-optimizer format uses ShardedTensor.flattened_range,
# which its own dist_checkpointing then refuses; megatron's training loop asks for this one
# (fully parallel save and load, reshardable over data-parallel sizes).
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


def rng_state(layout):
    """Every rank's random state, one shard per rank (megatron saves plain values from rank 0
    only): torch, numpy, Python and, on a GPU, CUDA's and megatron's model-parallel tracker."""
    from megatron.core import tensor_parallel
    from megatron.core.dist_checkpointing import ShardedObject

    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
        state["tracker"] = tensor_parallel.get_cuda_rng_tracker().get_states()
    return ShardedObject("rng_state", state, (layout.world_size,), (layout.rank,), replica_id=0)


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` saved."""
    from megatron.core import tensor_parallel

    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
        tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


class TrainingCheckpoints:
    """Save and resume a trainer's state (its ``model`` (DDP-wrapped), ``optimizer``, ``scheduler``
    and ``step``) in ``folder``; errors name ``<section>.output``."""

    def __init__(self, trainer, folder: Path, keep: int, section: str):
        self.trainer, self.folder, self.keep, self.section = trainer, Path(folder), int(keep), section
        self.layout = trainer.layout

    def _state(self, loading: bool) -> dict:
        # the unwrapped model's keys (the DDP wrapper would prefix them with "module.")
        model_state = self.trainer.model.module.sharded_state_dict(prefix="")
        return {"model": model_state,
                "optimizer": self.trainer.optimizer.sharded_state_dict(model_state, is_loading=loading,
                                                               metadata=OPTIMIZER_METADATA),
                "scheduler": self.trainer.scheduler.state_dict(), "step": self.trainer.step,
                "adam_steps": self._adam_steps(), "world_size": self.layout.world_size,
                "model_parallel": self._model_parallel(), "rng": rng_state(self.layout)}

    def _save_strategy(self):
        """megatron's fully parallel save, as Megatron-LM's loop uses it: the tensors replicated over
        data-parallel ranks (the weights) are split among them, so every rank writes its share
        instead of data-parallel rank 0 writing them all."""
        from megatron.core import parallel_state
        from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
        from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper

        return FullyParallelSaveStrategyWrapper(get_default_save_sharded_strategy(),
                                                parallel_state.get_data_parallel_group(with_context_parallel=True))

    def _load_strategy(self, checkpoint: Path):
        """The fully parallel load: each data-parallel rank reads a share of the replicated tensors
        and the ranks exchange them, instead of every rank reading every file."""
        from megatron.core import parallel_state
        from megatron.core.dist_checkpointing.serialization import get_default_load_sharded_strategy
        from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelLoadStrategyWrapper

        return FullyParallelLoadStrategyWrapper(get_default_load_sharded_strategy(str(checkpoint)),
                                                parallel_state.get_data_parallel_group(with_context_parallel=True))

    def _model_parallel(self) -> dict:
        return {"tensor": self.layout.tensor_parallel, "pipeline": self.layout.pipeline_parallel}

    def _torch_adams(self) -> list:
        return kernels.torch_adams(self.trainer.optimizer)

    def _adam_steps(self) -> list[float]:
        return [float(next(iter(adam.state.values()))["step"]) if adam.state else 0.0
                for adam in self._torch_adams()]

    def _restore_adam_steps(self, steps: list[float]) -> None:
        """megatron's distributed optimizer loads torch Adam's per-parameter ``step`` from the
        state it was asked to load into, not from the checkpoint; put the saved count back."""
        for adam, step in zip(self._torch_adams(), steps):
            for state in adam.state.values():
                state["step"] = torch.tensor(step)

    def _prime_torch_adam_state(self) -> None:
        """Give a fresh torch Adam the state entries its first step would create.

        Without Apex or TE (CPU, or a GPU image without them) megatron's distributed optimizer
        uses ``torch.optim.Adam`` and reads each parameter's ``step`` while building the state
        dict to load into, which a fresh Adam does not have yet (TE's FusedAdam keeps ``step``
        per group instead). The values are replaced by the checkpoint's.
        """
        for inner in self._torch_adams():
            if len(inner.state):
                continue
            for group in inner.param_groups:
                for parameter in group["params"]:
                    inner.state[parameter] = {"step": torch.tensor(0.0),
                                              "exp_avg": torch.zeros_like(parameter),
                                              "exp_avg_sq": torch.zeros_like(parameter)}

    def save(self) -> None:
        """Save the training state under ``folder/step-NNNNNN`` and point ``latest`` at it."""
        from megatron.core import dist_checkpointing

        self.trainer.sync_parameters()
        folder = self.folder
        name = f"step-{self.trainer.step:06d}"
        final, staging = folder / name, folder / f".{name}.incomplete"
        if final.exists() and (folder / "latest.json").exists() and \
                json.loads((folder / "latest.json").read_text())["checkpoint"] == name:
            return  # this step's state is saved (it is a function of the step): never replace it
        if self.layout.is_main:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        torch.distributed.barrier()
        dist_checkpointing.save(self._state(loading=False), str(staging), self._save_strategy())
        torch.distributed.barrier()
        checksums = self._checksums(staging)
        if self.layout.is_main:
            write_json(staging / CHECKSUMS, checksums)
            replace_folder(staging, final)
            write_json(folder / "latest.json", {"checkpoint": name, "step": self.trainer.step})
            kept = sorted((p for p in folder.glob("step-*") if p.is_dir()), key=_step)
            for old in kept[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        torch.distributed.barrier()

    def _checksums(self, folder: Path) -> dict:
        """sha256 of every file of a training checkpoint, the files split over the ranks; each
        rank also makes its files and their folders durable (megatron's writers do not fsync), so
        ``latest`` never points at a checkpoint a power loss could tear."""
        names = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != CHECKSUMS)
        mine = {name: sha256_file(folder / name, sync=True) for name in names[self.layout.rank::self.layout.world_size]}
        for parent in sorted({(folder / name).parent for name in mine}):
            fsync_folder(parent)
        every: list = [None] * self.layout.world_size
        torch.distributed.all_gather_object(every, mine)
        return {name: digest for part in every for name, digest in part.items()}

    def _verify(self, folder: Path) -> None:
        """Refuse, by name, a training checkpoint whose files do not match their checksums."""
        listed = folder / CHECKSUMS
        if not listed.exists():  # written before checksums were: nothing to compare against
            return
        expected = json.loads(listed.read_text())
        names = sorted(expected)[self.layout.rank::self.layout.world_size]
        bad = [n for n in names if not (folder / n).exists() or sha256_file(folder / n) != expected[n]]
        every: list = [None] * self.layout.world_size
        torch.distributed.all_gather_object(every, bad)
        bad = sorted(n for part in every for n in part)
        require(not bad, f"training checkpoint {folder} is corrupted ({', '.join(bad[:3])} does not match "
                f"its checksum); remove that folder (rm -r {folder}) and rerun: training resumes from "
                "the newest checkpoint left", f"{self.section}.output")

    def load(self) -> bool:
        """Resume from ``folder``'s latest checkpoint (setting the trainer's ``step``); False when
        there is none."""
        from megatron.core import dist_checkpointing

        folder = self.folder
        latest = folder / "latest.json"
        if not latest.exists():
            return False
        name = json.loads(latest.read_text())["checkpoint"]
        if not (folder / name).is_dir():  # removed by hand (e.g. corrupted): the newest one left
            kept = [p.name for p in sorted((p for p in folder.glob("step-*") if p.is_dir()), key=_step)]
            require(kept, f"{latest} names {name}, which is gone, and no other checkpoint is left; "
                    "remove the folder to start over", f"{self.section}.output")
            name = kept[-1]
        self._verify(folder / name)
        self._prime_torch_adam_state()
        request = self._state(loading=True)
        common = dist_checkpointing.load_common_state_dict(str(folder / name))
        saved = common.get("model_parallel")   # None: written before the layout was recorded
        # the dp_reshardable optimizer state reshards over data-parallel sizes only: another TP or
        # PP fails deep inside megatron's load, so stop here with the way out
        require(saved is None or saved == self._model_parallel(), f"{folder / name} was saved at "
                f"TP={saved and saved['tensor']} PP={saved and saved['pipeline']}; this run is "
                f"TP={self.layout.tensor_parallel} PP={self.layout.pipeline_parallel}, and its optimizer state "
                "reshards over data-parallel sizes only. Resume at the saved layout (a smaller micro-batch or "
                f"{self.section}.recompute=selective if memory was short), or FORCE=1 to train again from the "
                "start (the old result is kept aside)", f"run.stage_parallel.{self.section} / parallel.tensor")
        saved_world = common.get("world_size")
        if saved_world != self.layout.world_size:  # resharded: the saved ranks' random states do not map
            del request["rng"]
            if self.layout.is_main:
                print(f"[{self.section}] resuming on {self.layout.world_size} processes (saved on "
                      f"{saved_world}): random states start fresh", flush=True)
        state = dist_checkpointing.load(request, str(folder / name), self._load_strategy(folder / name))
        with torch.no_grad():  # copies into parameters and their optimizer shards, not differentiable
            result = self.trainer.model.module.load_state_dict(state["model"], strict=False)
            self.trainer.optimizer.load_state_dict(state["optimizer"])
        missing = [key for key in result.missing_keys if not key.endswith("_extra_state")]
        require(not missing and not result.unexpected_keys, f"training checkpoint {folder / name} does not "
                f"fit the model: missing {missing[:4]}, unexpected {result.unexpected_keys[:4]}",
                f"{self.section}.output")
        self._restore_adam_steps(state["adam_steps"])
        kernels.fused_torch_adam(self.trainer.optimizer)   # the loaded groups and host step counts, fused again
        self.trainer.scheduler.load_state_dict(state["scheduler"])
        self.trainer.step = int(state["step"])
        if "rng" in state:
            set_rng_state(state["rng"])
        return True


def _step(path: Path) -> int:
    """``step-0001200`` -> 1200: checkpoints in step order (a name sort breaks past six digits)."""
    return int(path.name.split("-", 1)[1])
