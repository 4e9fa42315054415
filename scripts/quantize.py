"""Quantize each distilled student with ModelOpt (FP8, INT4-AWQ, ...) and export it for serving engines.

    python scripts/quantize.py experiment=demo prune=depth
    python scripts/quantize.py experiment=smollm2_135m quantize.formats=[fp8]

The stage itself is ``quantize`` in :func:`pipelines.stages.registry`; this script only composes
``configs/pipeline.yaml`` and runs it.
"""

import hydra

from pipelines.launch.cli import run_stage


@hydra.main(config_path="../configs", config_name="pipeline", version_base="1.3")
def main(cfg):
    run_stage("quantize", cfg)


if __name__ == "__main__":
    main()
