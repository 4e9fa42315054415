"""Tokenize the experiment's corpus into megatron-core indexed datasets (train and valid splits).

    python scripts/prepare.py experiment=demo
    python scripts/prepare.py data=austen data.output=data/austen

The stage itself is ``prepare`` in :func:`pipelines.stages.registry`; this script only composes
``configs/pipeline.yaml`` and runs it.
"""

import hydra

from pipelines.launch.cli import run_stage


@hydra.main(config_path="../configs", config_name="pipeline", version_base="1.3")
def main(cfg):
    run_stage("prepare", cfg)


if __name__ == "__main__":
    main()
