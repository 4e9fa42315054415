"""Run the teacher once and cache its top-k soft labels, resumably.

    python scripts/logits.py experiment=demo
    python scripts/logits.py logits.teacher=CKPT logits.output=CACHE data=austen

The stage itself is ``logits`` in :func:`pipelines.stages.registry`; this script only composes
``configs/pipeline.yaml`` and runs it.
"""

import hydra

from pipelines.launch.cli import run_stage


@hydra.main(config_path="../configs", config_name="pipeline", version_base="1.3")
def main(cfg):
    run_stage("logits", cfg)


if __name__ == "__main__":
    main()
