"""The training loops' metrics: console progress lines, ``metrics.jsonl`` and TensorBoard.

``metrics.jsonl`` has one line per logged step (``kind: train``) and per evaluation (``kind:
eval``). On resume, lines past the checkpoint resumed from are dropped, so the file never holds
a step twice; TensorBoard purges the same steps.
"""

from __future__ import annotations

import json
import time
from pathlib import Path


class Logger:
    """Console progress lines, ``metrics.jsonl`` and TensorBoard (main rank only)."""

    def __init__(self, folder: Path, enabled: bool, resume_step: int, total_steps: int, tokens_per_step: int,
                 tag: str = "distill"):
        self.tag = tag
        self.enabled, self.total, self.tokens_per_step = enabled, total_steps, tokens_per_step
        self.path = folder / "metrics.jsonl"
        self.writer = None
        self.started, self.start_step = time.perf_counter(), resume_step
        if not enabled:
            return
        folder.mkdir(parents=True, exist_ok=True)
        if self.path.exists():  # drop lines past the checkpoint we resumed from
            lines = [line for line in self.path.read_text().splitlines() if _step(line) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in lines))
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(folder / "tensorboard"), purge_step=resume_step + 1)
        except ImportError:  # tensorboard is optional
            self.writer = None

    def log(self, step: int, metrics: dict, kind: str = "train") -> None:
        if not self.enabled:
            return
        record = {"step": step, "kind": kind, **metrics}
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(f"{kind}/{key}", value, step)
            self.writer.flush()

    def progress(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.started
        done = step - self.start_step
        rate = done * self.tokens_per_step / elapsed if elapsed > 0 else 0.0
        eta = (self.total - step) * elapsed / done if done else 0.0
        print(f"[{self.tag}] step {step}/{self.total} loss {metrics['loss']:.4f} kd {metrics['kd']:.4f} "
              f"ce {metrics['ce']:.4f} lr {metrics['lr']:.2e} {rate:,.0f} tokens/s "
              f"data wait {metrics.get('data_wait_s', 0.0):.3f} s ETA {eta / 60:.1f} min", flush=True)


def _step(line: str) -> float:
    """A metrics line's step; a torn line (a crash mid-write) counts as past every checkpoint."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")
