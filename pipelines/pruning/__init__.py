"""Structured pruning: depth, width (ModelOpt Minitron) and the architecture search."""
