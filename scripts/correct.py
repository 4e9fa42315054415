"""Teacher correction: fine-tune the teacher on the distillation data (the distill loop, no teacher).

    python scripts/correct.py experiment=demo
    python scripts/correct.py correct.student=TEACHER correct.output=OUT correct.train_steps=100

The stage itself is ``correct`` in :func:`pipelines.stages.registry`; this script only composes
``configs/pipeline.yaml`` and runs it.
"""

import hydra

from pipelines.launch.cli import run_stage


@hydra.main(config_path="../configs", config_name="pipeline", version_base="1.3")
def main(cfg):
    run_stage("correct", cfg)


if __name__ == "__main__":
    main()
