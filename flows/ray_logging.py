"""What the flow's Ray workers print: each line of a stage once, without Ray Train's bookkeeping noise.

Two settings of Ray Train, both given to every worker by flows/cluster.py:
  * `RAY_TRAIN_ENABLE_PRINT_PATCH=0`: Ray Train replaces `print` in its workers by a function that logs
    the line and, when something has wrapped sys.stdout, also prints it, so every line a training stage
    printed reached the flow's log twice. Unpatched, a worker's prints go to its stdout, which Ray
    forwards to the driver once.
  * `quiet_placement_group_cleaner` (the embedded cluster's `worker_process_setup_hook`): Ray Train's
    PlacementGroupCleaner actor asks the State API every second whether the training controller is
    alive, and the State API lives in the dashboard, which the embedded cluster does not start. It
    then logged "Failed to query Ray Train Controller actor state" about once a second for the whole
    stage (hundreds of lines for the rehearsal's training stages). The embedded cluster ends with the driver,
    taking its placement groups with it, so the cleaner has nothing to do there; its warnings are
    dropped, its errors kept. A remote cluster runs its dashboard, and its cleaner works and speaks.
"""
from __future__ import annotations

import logging

PRINT_ONCE_ENV = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
SETUP_HOOK = f"{__name__}.quiet_placement_group_cleaner"


def quiet_placement_group_cleaner() -> None:
    """Runs in each worker process of the embedded cluster as it starts."""
    logging.getLogger(CLEANER_LOGGER).setLevel(logging.ERROR)
