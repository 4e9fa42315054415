"""Run the teacher once and cache its top-k soft labels, resumably.

    python scripts/teacher_logits.py logits.teacher=CKPT logits.output=CACHE data=austen
"""

import hydra

from pipelines.cli import run_cli
from pipelines.teacher_logits import run


@hydra.main(config_path="../configs", config_name="teacher_logits", version_base="1.3")
def main(cfg):
    run_cli(run, cfg)


if __name__ == "__main__":
    main()
