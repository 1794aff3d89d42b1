"""Evaluation: torch-fidelity metrics, the domain feature net, the FID report table and plot."""
