"""Evaluate checkpoints: MMLU (k-shot, answer-letter log-likelihood) and validation loss.

    python scripts/eval.py experiment=demo                  (every finished model in the run)
    python scripts/eval.py eval.model=CKPT eval.output=OUT eval.limit=5

The stage itself is ``eval`` in :func:`pipelines.stages.registry`; this script only composes
``configs/pipeline.yaml`` and runs it.
"""

import hydra

from pipelines.launch.cli import run_stage


@hydra.main(config_path="../configs", config_name="pipeline", version_base="1.3")
def main(cfg):
    run_stage("eval", cfg)


if __name__ == "__main__":
    main()
