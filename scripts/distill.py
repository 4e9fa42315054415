"""Distill a student from the teacher (cached logits or online), or fine-tune it (teacher=none).

    python scripts/distill.py experiment=demo prune=depth
    python scripts/distill.py distill.student=CKPT distill.teacher=none distill.kd_weight=0 distill.output=OUT

The stage itself is ``distill`` in :func:`pipelines.stages.registry`; this script only composes
``configs/pipeline.yaml`` and runs it.
"""

import hydra

from pipelines.launch.cli import run_stage


@hydra.main(config_path="../configs", config_name="pipeline", version_base="1.3")
def main(cfg):
    run_stage("distill", cfg)


if __name__ == "__main__":
    main()
