"""Import a Hugging Face Llama checkpoint into megatron-core.

    python scripts/import_hf.py source=HF_DIR output=OUT_DIR
"""

import hydra

from pipelines.convert import import_hf
from pipelines.cli import run_cli


@hydra.main(config_path="../configs", config_name="import_hf", version_base="1.3")
def main(cfg):
    run_cli(import_hf, cfg)


if __name__ == "__main__":
    main()
