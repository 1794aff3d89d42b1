"""Where flows run: the Ray cluster (embedded or remote) and the Prefect API its workers talk to.

Embedded (`resources.ray_address: ""`): Ray starts in this process with `resources.ray_num_cpus`
CPUs (0 = all). Remote (`ray_address: "ray://head:10001"` or `"auto"`): the driver connects and
ships the project's code to the workers through `runtime_env.working_dir` (so `flows`,
`pipeline` and `flexvar` import there); the workers must ALSO see the project's working tree at
the same absolute path through a shared filesystem (NFS, Lustre, a synced volume), because stage
commands read and write the DVC workspace (data/, models/, ...) in place and the driver
commits their outputs from there.

Ray workers run Prefect task runs, which report to a Prefect API. Without PREFECT_API_URL every
worker would start its own temporary server (tens of seconds each), so `ensure_prefect_api()`
starts one temporary server in the driver and the URL is passed to the workers.
"""
from __future__ import annotations

import contextlib
import os
import socket
import sys
from pathlib import Path
from typing import Any, Iterator

from flexvar.config import ResourcesConfig

# Not shipped to remote workers: DVC outputs and caches (workers read them from the shared filesystem).
SHIP_EXCLUDES = [".git", ".venv", ".cache", ".dvc/cache", ".dvc/tmp", "data", "models", "samples", "metrics",
                 "plots", "reports", "mlruns", "mlartifacts", "mlflow.db", "ray_results", ".flexvar"]


LOCAL_RAY_AUTH_MODE = "disabled"

# Ray Train replaces print() in its workers by a function that logs the line and, when something has
# wrapped sys.stdout, prints it as well: every line of a training stage reached the flow's log twice.
PRINT_ONCE_ENV = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}


def ensure_prefect_api() -> str:
    """PREFECT_API_URL, starting a temporary local Prefect server when none is configured.

    The URL is also put in os.environ, which Ray workers started afterwards inherit.
    """
    from prefect.settings import PREFECT_API_URL

    url = os.environ.get("PREFECT_API_URL") or PREFECT_API_URL.value()
    if not url:
        from prefect.server.api.server import SubprocessASGIServer

        if os.environ.get("PREFECT_HOME"):   # its SQLite database lives there; a fresh clone has no .cache/
            Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)

        server = SubprocessASGIServer()
        server.start(timeout=180)   # slow on a busy 2-core machine
        url = server.api_url
    os.environ["PREFECT_API_URL"] = url
    return url


@contextlib.contextmanager
def prefect_api() -> Iterator[str]:
    """Run the body against `ensure_prefect_api()`'s server (Prefect reads its settings once, at import)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    url = ensure_prefect_api()
    with temporary_settings(updates={PREFECT_API_URL: url}):
        yield url


def worker_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment every Ray worker gets: the Prefect API, offline switches, prints passed through once."""
    from pipeline.env import TELEMETRY_OFF

    env = {**PRINT_ONCE_ENV, **{k: os.environ[k] for k in TELEMETRY_OFF if k in os.environ}}
    if os.environ.get("PREFECT_API_URL"):
        env["PREFECT_API_URL"] = os.environ["PREFECT_API_URL"]
    return {**env, **(extra or {})}


def ray_init_kwargs(res: ResourcesConfig, root: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Keyword arguments of `ray.init` for `resources` (address handled by the caller)."""
    env = worker_env(env)
    if not res.ray_address:
        # Local workers import flows/pipeline/flexvar from the project on PYTHONPATH.
        path = os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH", "")]))
        # The dashboard serves the State API, which Ray Train's placement-group cleaner asks whether a
        # training controller still lives; without it a stage task killed mid-training (for memory, say)
        # and retried waits forever for the CPUs/GPUs its dead predecessor's placement group holds. Its
        # workers are told its address, which a second Ray instance on the machine would make ambiguous.
        port = free_port()
        env = {**env, "PYTHONPATH": path, "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}
        return {"num_cpus": res.ray_num_cpus or os.cpu_count(), "include_dashboard": True,
                "dashboard_host": "127.0.0.1", "dashboard_port": port, "runtime_env": {"env_vars": env}}
    return {"runtime_env": {"working_dir": str(root), "excludes": SHIP_EXCLUDES, "env_vars": env}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_ray(res: ResourcesConfig, root: Path, env: dict[str, str] | None = None) -> bool:
    """Start or connect to Ray unless it is already up; True if this call started it."""
    import ray

    if ray.is_initialized():
        return False
    if not res.ray_address:
        # The embedded cluster lives in this process on this machine, so it needs no token; a remote
        # cluster (ray_address set) keeps Ray's token authentication as its operator configured it.
        os.environ.setdefault("RAY_AUTH_MODE", LOCAL_RAY_AUTH_MODE)
        # Ray starts its workers at nice 15; on a machine shared with other work (or with a `dvc repro`)
        # that starves the trials (a sweep trial measured ~3x slower beside normal-priority processes),
        # so the embedded cluster's workers run at the priority of the command that started them.
        os.environ.setdefault("RAY_worker_niceness", "0")
    kwargs = ray_init_kwargs(res, root, env)
    ray.init(res.ray_address or None, **kwargs)
    return True


def python_path_env(root: Path) -> dict[str, str]:
    """PATH/PYTHONPATH so `python -m pipeline.X` in a stage command resolves to this interpreter and project."""
    return {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH", "")]))}
