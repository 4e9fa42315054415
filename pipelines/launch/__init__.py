"""Launching stages: the stage plan, local runs, SLURM, sweeps, preflight and memory plans, the CLI."""
