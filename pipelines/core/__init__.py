"""Errors, artifacts (manifests, atomic writes) and experiment paths: what every layer uses."""
