"""Prune the teacher by depth or width into one student (prune=<student>).

    python scripts/prune.py experiment=demo prune=width

The stage itself is ``prune`` in :func:`pipelines.stages.registry`; this script only composes
``configs/pipeline.yaml`` and runs it.
"""

import hydra

from pipelines.launch.cli import run_stage


@hydra.main(config_path="../configs", config_name="pipeline", version_base="1.3")
def main(cfg):
    run_stage("prune", cfg)


if __name__ == "__main__":
    main()
