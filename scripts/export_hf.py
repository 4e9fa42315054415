"""Export an engine checkpoint back to a Hugging Face Llama folder.

    python scripts/export_hf.py source=CKPT_DIR output=HF_DIR
"""

import hydra

from pipelines.convert import export_hf
from pipelines.cli import run_cli


@hydra.main(config_path="../configs", config_name="export_hf", version_base="1.3")
def main(cfg):
    run_cli(export_hf, cfg)


if __name__ == "__main__":
    main()
