"""Import a Hugging Face Llama checkpoint into megatron-core.

    python scripts/import_hf.py import_hf.source=HF_DIR import_hf.output=OUT_DIR
    python scripts/import_hf.py experiment=demo      (demo: a random tiny teacher with the data's tokenizer)
"""

import hydra

from pipelines.convert import import_stage
from pipelines.cli import run_cli


@hydra.main(config_path="../configs", config_name="import_hf", version_base="1.3")
def main(cfg):
    run_cli(import_stage, cfg)


if __name__ == "__main__":
    main()
