"""Time every model of the run (prefill, time to first token, decode) and state its memory.

    python scripts/speed.py experiment=demo
    python scripts/speed.py experiment=smollm2_135m eval.speed.repeats=3

The stage itself is ``speed`` in :func:`pipelines.stages.registry`; this script only composes
``configs/pipeline.yaml`` and runs it.
"""

import hydra

from pipelines.launch.cli import run_stage


@hydra.main(config_path="../configs", config_name="pipeline", version_base="1.3")
def main(cfg):
    run_stage("speed", cfg)


if __name__ == "__main__":
    main()
