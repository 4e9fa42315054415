"""Export an engine checkpoint back to a Hugging Face Llama folder.

    python scripts/export_hf.py export_hf.source=CKPT_DIR export_hf.output=HF_DIR
"""

import hydra

from pipelines.convert import export_stage
from pipelines.cli import run_cli


@hydra.main(config_path="../configs", config_name="export_hf", version_base="1.3")
def main(cfg):
    run_cli(export_stage, cfg)


if __name__ == "__main__":
    main()
