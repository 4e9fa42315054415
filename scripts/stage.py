"""Run a stage (or the whole pipeline) here, or submit it to SLURM: what every make target calls.

    python scripts/stage.py prune experiment=demo
    python scripts/stage.py pipeline experiment=llama31_8b_width_4b cluster=slurm --dry-run
"""

import sys

from pipelines.launch.cli import run_cli
from pipelines.launch.main import main

if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
