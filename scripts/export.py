"""Export an engine checkpoint (imported, pruned or distilled) as a Hugging Face Llama folder.

    python scripts/export.py experiment=demo prune=depth
    python scripts/export.py export.source=CKPT_DIR export.output=HF_DIR

The stage itself is ``export`` in :func:`pipelines.stages.registry`; this script only composes
``configs/pipeline.yaml`` and runs it.
"""

import hydra

from pipelines.launch.cli import run_stage


@hydra.main(config_path="../configs", config_name="pipeline", version_base="1.3")
def main(cfg):
    run_stage("export", cfg)


if __name__ == "__main__":
    main()
