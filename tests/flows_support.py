"""Shared real services for the flows tests: one Prefect API server and one local Ray per pytest process.

Started lazily by the first test that needs them and stopped at exit, so test_flows, test_sweep
and test_ray_train pay each startup once. Order matters: the Prefect server first, so Ray's
workers inherit PREFECT_API_URL and never start a temporary server of their own.
"""
from __future__ import annotations

import atexit
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from flows.cluster import free_port

ROOT = Path(__file__).resolve().parents[1]
_server: subprocess.Popen | None = None


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def prefect_api(timeout_s: float = 180) -> str:
    """A `prefect server start` process on a free localhost port (PREFECT_HOME from conftest: a tmp dir)."""
    global _server
    if _server is None:
        port = free_port()
        url = f"http://127.0.0.1:{port}/api"
        env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_SERVER_UI_ENABLED": "false"}
        env.pop("PREFECT_API_URL", None)
        log = open(Path(os.environ["PREFECT_HOME"]).parent / "prefect-server.log", "w")
        _server = subprocess.Popen([str(Path(sys.executable).parent / "prefect"), "server", "start", "--host",
                                    "127.0.0.1", "--port", str(port), "--no-services", "--no-ui"],
                                   stdout=log, stderr=subprocess.STDOUT, env=env)
        atexit.register(_stop_server)
        deadline = time.monotonic() + timeout_s
        while not _healthy(url):
            assert _server.poll() is None, f"prefect server exited; see {log.name}"
            assert time.monotonic() < deadline, f"prefect server not healthy in {timeout_s}s; see {log.name}"
            time.sleep(0.5)
        os.environ["PREFECT_API_URL"] = url
    return os.environ["PREFECT_API_URL"]


def _stop_server() -> None:
    if _server is not None and _server.poll() is None:
        _server.terminate()
        try:
            _server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            _server.kill()


def local_ray(num_cpus: int = 2) -> None:
    """ray.init(num_cpus=2) through flows.cluster (workers get the project on PYTHONPATH and the Prefect URL)."""
    prefect_api()
    from flexvar.config import ResourcesConfig
    from flows.cluster import init_ray

    if init_ray(ResourcesConfig(ray_num_cpus=num_cpus), ROOT):
        import ray

        atexit.register(ray.shutdown)


def stage_workdir(d: Path, extra: dict | None = None) -> Path:
    """A project folder for the train_transformer stage: params (sections of `extra` merged in), a random
    tiny tokenizer (tok/), cached structured latents (lat/)."""
    import yaml

    from tests.tiny_latents import TINY_TOKENIZER as tok
    from tests.tiny_latents import write_tokenizer_and_latents

    write_tokenizer_and_latents(d, num_train=64)
    params = {
        "data": {"resolution": 32}, "tokenizer": tok,
        "transformer": {"depth": 1, "width": 32, "heads": 2, "drop_path_rate": 0.0, "class_dropout": 0.0},
        "train_transformer": {"steps": 8, "batch_size": 8, "warmup_steps": 2, "checkpoint_every": 4,
                              "eval_every": 8, "log_every": 1, "val_batches": 1, "precision": "fp32"},
        "resources": {"num_threads": 1, "train_workers": 2},
        "variants": {"depths": [1], "schedules": ["canonical"]},
        "sample": {"schedules": {"canonical": {"scales": [1, 2, 3, 4, 5, 6, 8]}}},
    }
    for section, values in (extra or {}).items():
        params[section] = {**params.get(section, {}), **values}
    (d / "params.yaml").write_text(yaml.safe_dump(params))
    return d
