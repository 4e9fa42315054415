"""Write the recovery report (report.md, report.json, report.png) from the eval results.

    python scripts/report.py experiment=demo
"""

import hydra

from pipelines.cli import run_cli
from pipelines.report import run


@hydra.main(config_path="../configs", config_name="report", version_base="1.3")
def main(cfg):
    run_cli(run, cfg)


if __name__ == "__main__":
    main()
