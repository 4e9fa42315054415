"""Prune a checkpoint by depth (drop layers) or width (ModelOpt Minitron).

    python scripts/prune.py prune=depth prune.source=CKPT prune.output=OUT prune.target_num_layers=2
    python scripts/prune.py prune=width prune.source=CKPT prune.output=OUT prune.target.hidden_size=48
"""

import hydra

from pipelines.cli import run_cli
from pipelines.prune import run


@hydra.main(config_path="../configs", config_name="prune", version_base="1.3")
def main(cfg):
    run_cli(run, cfg)


if __name__ == "__main__":
    main()
