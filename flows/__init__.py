"""Prefect flows on Ray: the dvc.yaml graph, Ray Train stages and Ray Tune sweeps.

Importing `pipeline` first sets up the tool environment once (pipeline/__init__.py), before
any flow imports Prefect or Ray.
"""
import pipeline  # noqa: F401  (environment setup)
