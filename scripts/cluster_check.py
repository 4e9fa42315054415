"""The first job on a new cluster: TP=8, 2 and 1 on one node, against each other and the plans.

    make cluster-check CLUSTER=slurm ARGS="cluster.partition=... cluster.account=..."
    make cluster-check CLUSTER=slurm DRY_RUN=1       (print the batch script)

The job's steps run this script with ``--part``; see :mod:`pipelines.tools.cluster_check`.
"""

import sys

from pipelines.launch.cli import run_cli
from pipelines.tools.cluster_check import main

if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
