"""Evaluate a checkpoint: MMLU (k-shot, answer-letter log-likelihood) and validation loss.

    python scripts/evaluate.py experiment=demo                       (every model in the run, then the report)
    python scripts/evaluate.py eval.model=CKPT eval.output=OUT eval.limit=5
"""

import hydra

from pipelines.cli import run_cli
from pipelines.evaluate import run


@hydra.main(config_path="../configs", config_name="evaluate", version_base="1.3")
def main(cfg):
    run_cli(run, cfg)


if __name__ == "__main__":
    main()
