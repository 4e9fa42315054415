"""Write the recovery report (report.md, report.json, report.png) from the eval results.

    python scripts/report.py experiment=demo

The stage itself is ``report`` in :func:`pipelines.stages.registry`; this script only composes
``configs/pipeline.yaml`` and runs it.
"""

import hydra

from pipelines.launch.cli import run_stage


@hydra.main(config_path="../configs", config_name="pipeline", version_base="1.3")
def main(cfg):
    run_stage("report", cfg)


if __name__ == "__main__":
    main()
