"""Write a random-initialised Hugging Face Llama of a model config.

    python scripts/random_hf.py model=tiny output=runs/demo/random_hf
"""

import hydra

from pipelines.hf.random_hf import write_random_hf
from pipelines.launch.cli import run_cli


@hydra.main(config_path="../configs", config_name="random_hf", version_base="1.3")
def main(cfg):
    run_cli(write_random_hf, cfg)


if __name__ == "__main__":
    main()
