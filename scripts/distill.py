"""Distill a student from a teacher, or fine-tune a model on the data (teacher=none).

    python scripts/distill.py distill.student=PRUNED distill.cache=CACHE distill.output=OUT
    python scripts/distill.py distill.student=CKPT distill.teacher=none distill.kd_weight=0 distill.output=OUT
"""

import hydra

from pipelines.cli import run_cli
from pipelines.distill import run


@hydra.main(config_path="../configs", config_name="distill", version_base="1.3")
def main(cfg):
    run_cli(run, cfg)


if __name__ == "__main__":
    main()
