"""Check a GPU node before a long job: environment, the tiny pipeline on one GPU, an 8B-width slice.

    make gpu-check                       (PYTHON=python inside the container)
    python scripts/gpu_check.py paths.runs=/scratch/runs
"""

import sys

from pipelines.launch.cli import run_cli
from pipelines.tools.gpu_check import main

if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
