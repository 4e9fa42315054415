"""Tokenize a corpus into megatron-core indexed datasets (train and valid splits).

    python scripts/prepare_data.py data=austen
"""

import hydra

from pipelines.cli import run_cli
from pipelines.data import prepare


@hydra.main(config_path="../configs", config_name="prepare_data", version_base="1.3")
def main(cfg):
    run_cli(prepare, cfg)


if __name__ == "__main__":
    main()
