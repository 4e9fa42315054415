"""Teacher correction: fine-tune the teacher on the distillation data (the distill stage, no teacher).

    python scripts/correct.py experiment=demo
    python scripts/correct.py correct.student=TEACHER correct.output=OUT correct.train_steps=100
"""

import hydra

from pipelines.cli import run_cli
from pipelines.distill import run


@hydra.main(config_path="../configs", config_name="correct", version_base="1.3")
def main(cfg):
    run_cli(lambda c: run(c, "correct"), cfg)


if __name__ == "__main__":
    main()
