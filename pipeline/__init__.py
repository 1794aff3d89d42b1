"""The DVC stages (one module each) and what they share.

Importing this package sets up the tool environment once, before any stage imports torch,
datasets or MLflow: telemetry off, hub access offline, tool state inside the project's
`.cache/` (pipeline/env.py). Stages, flows and tests all come through here, so no module
repeats it.
"""
from pipeline.env import setup as _setup_environment

_setup_environment()
