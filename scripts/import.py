"""Import a Hugging Face Llama folder (or Hub id) into an engine checkpoint.

    python scripts/import.py experiment=demo                  (the demo: a random tiny teacher with the data's tokenizer)
    python scripts/import.py import.source=HF_DIR import.output=OUT_DIR

The stage itself is ``import`` in :func:`pipelines.stages.registry`; this script only composes
``configs/pipeline.yaml`` and runs it.
"""

import hydra

from pipelines.launch.cli import run_stage


@hydra.main(config_path="../configs", config_name="pipeline", version_base="1.3")
def main(cfg):
    run_stage("import", cfg)


if __name__ == "__main__":
    main()
