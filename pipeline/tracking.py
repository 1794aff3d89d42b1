"""MLflow tracking for every stage: the only module in the project that imports mlflow.

    with stage_run("evaluate", params, ["evaluate", "sample.schedules.short"], variant="d2/short") as log:
        log.log_metrics({"fid_domain": 12.3})
        log.log_artifact("metrics/eval/d2/short.json")

Where runs go (first that applies):
  1. `tracking.uri` in params.yaml,
  2. the MLFLOW_TRACKING_URI environment variable,
  3. the embedded store: `sqlite:///<project>/mlflow.db`, artifacts under `<project>/mlartifacts/`
     (nothing to start; `mlflow ui --backend-store-uri sqlite:///mlflow.db` browses it).
<project> is DVC_ROOT (set by dvc for stage commands), else the working directory.

A server that does not answer fails the stage within seconds, naming the URI, unless
`tracking.required: false` — then the stage runs untracked and prints that tracking is off.

One parent run per pipeline execution. Each stage is its own process, so the parent is found by
a *pipeline run id* that all stages of one execution agree on:
  - FLEXVAR_PARENT_RUN_ID set: that run is the parent (orchestrators that create it themselves);
  - else FLEXVAR_PIPELINE_RUN_ID set: that string is the pipeline run id (Prefect/Ray flows, tests);
  - else under `dvc repro` / `dvc exp run` (DVC_STAGE is set): the id of the dvc process itself
    (boot id + pid + start time from /proc, the first ancestor without DVC_STAGE in its environment),
    so every stage of one `dvc repro` shares it and the next `dvc repro` gets a new one;
  - else this process alone (a stage run by hand gets its own parent).
The parent is the run tagged `pipeline_run_id=<id>, flexvar_role=pipeline` in the experiment,
created by the first stage (under a file lock in .flexvar/, so concurrent stages make one).
The parent is marked finished after each stage ends, so its end time is the last stage's.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator, NamedTuple

from flexvar.config import Params, select
from flexvar.errors import FlexvarError
from flexvar.run_logger import RunLogger
from flexvar.transformer.schedules import schedule_size, schedule_steps

from pipeline.common import file_lock

PROBE_TIMEOUT_S = 3
# MLflow 3 experiment type tag: the UI opens a model-training experiment on its runs table, not on
# the GenAI overview (values in mlflow's UI code: custom_model_development | genai_development | ...).
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
# ... but the UI's GenAI / Model training switch is kept in browser storage (GenAI on a first visit)
# and does not follow that tag; the URL parameter workflowType=machine_learning sets it for the page,
# so this link opens the experiment on its runs table in any browser (checked by benchmarks/mlflow_ui_tour.py).
RUNS_PAGE = "{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
MLFLOW_UI_BASE = "http://127.0.0.1:5000"   # where `mlflow ui` serves by default
PARAM_CHUNK = 100     # MLflow's log_batch limit on params per call
METRIC_CHUNK = 1000   # ... and on metrics per call


class TrackingError(FlexvarError, RuntimeError):
    """The tracking store cannot be used (unreachable server, bad URI)."""


# --------------------------------------------------------------------------- where
def project_root() -> Path:
    return Path(os.environ.get("DVC_ROOT") or os.getcwd()).resolve()


def resolve_uri(params: Params, root: Path | None = None) -> tuple[str, bool]:
    """(tracking URI, embedded?): tracking.uri, else MLFLOW_TRACKING_URI, else <root>/mlflow.db."""
    uri = params.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if uri:
        return uri, False
    return f"sqlite:///{(root or project_root()) / 'mlflow.db'}", True


def _is_remote(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


@contextlib.contextmanager
def _fast_http():
    """Few-second timeout and no retries, for the reachability probe only."""
    keys = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(PROBE_TIMEOUT_S)}
    old = {k: os.environ.get(k) for k in keys}
    os.environ.update(keys)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _unreachable(uri: str, err: BaseException) -> TrackingError:
    text = str(err)
    errno = re.search(r"\[Errno -?\d+\][^'\")\]]*", text)
    reason = errno.group(0).strip() if errno else ("timed out" if "timed out" in text.lower()
                                                    else (text.strip().splitlines() or [type(err).__name__])[0][:200])
    return TrackingError(
        f"MLflow tracking server at {uri} is unreachable ({reason}). "
        f"Start it (e.g. `mlflow server --backend-store-uri sqlite:///mlflow.db --port PORT`), point "
        f"tracking.uri or MLFLOW_TRACKING_URI at a running server, leave both empty for the embedded "
        f"store, or set tracking.required: false in params.yaml to run without tracking.")


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def probe(uri: str):
    """An MlflowClient for `uri`, after checking within seconds that the store answers."""
    client = _client(uri)
    if _is_remote(uri):
        try:
            with _fast_http():
                client.search_experiments(max_results=1)
        except Exception as e:  # noqa: BLE001 - any failure here means "cannot track"
            raise _unreachable(uri, e) from None
    return client


def _experiment_id(client, name: str, embedded: bool, root: Path) -> str:
    """The experiment's id, creating (or restoring) it; embedded artifacts stay inside the project."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        location = None
        if embedded:
            safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
            location = (root / "mlartifacts" / safe).as_uri()
        return client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND)
    if exp.lifecycle_stage == "deleted":
        client.restore_experiment(exp.experiment_id)
    for key, value in EXPERIMENT_KIND.items():   # experiments made before the tag existed
        if exp.tags.get(key) != value:
            client.set_experiment_tag(exp.experiment_id, key, value)
    return exp.experiment_id


# --------------------------------------------------------------------------- pipeline run id
class Experiment(NamedTuple):
    client: Any            # mlflow.MlflowClient
    experiment_id: str
    uri: str               # the tracking URI it talks to


def open_experiment(params: Params, root: Path) -> Experiment:
    """params.tracking.experiment in the store params name (embedded SQLite under `root` by default):
    probed, the experiment created or restored. Raises TrackingError when the store does not answer.
    The public way into the store for stages and flows (the sweep)."""
    uri, embedded = resolve_uri(params, root)
    client = probe(uri)
    return Experiment(client, _experiment_id(client, params.tracking.experiment, embedded, root), uri)


def _proc_start(pid: int) -> str | None:
    """Start time (clock ticks since boot) of a process, from /proc/<pid>/stat; None off Linux."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _proc_ppid(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _has_dvc_stage(pid: int) -> bool:
    try:
        return b"\0DVC_STAGE=" in b"\0" + Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()[:8]
    except OSError:
        return "noboot"


def _process_key(pid: int) -> str:
    return f"{_boot_id()}-{pid}-{_proc_start(pid) or int(time.time())}"


def _dvc_process() -> int | None:
    """Pid of the dvc process running this stage: the first ancestor without DVC_STAGE in its env."""
    pid = os.getppid()
    while pid and pid > 1:
        if not _has_dvc_stage(pid):
            return pid
        pid = _proc_ppid(pid)
    return None


def pipeline_run_id() -> str:
    """The id shared by all stages of one pipeline execution (see the module docstring)."""
    if os.environ.get("FLEXVAR_PIPELINE_RUN_ID"):
        return os.environ["FLEXVAR_PIPELINE_RUN_ID"]
    if os.environ.get("DVC_STAGE"):
        pid = _dvc_process()
        if pid is not None:
            return f"dvc-{_process_key(pid)}"
    return f"proc-{_process_key(os.getpid())}"


# --------------------------------------------------------------------------- tags
def git_commit(root: Path) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    if out.returncode != 0:
        return "unknown"
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def dvc_lock_hash(root: Path) -> str:
    """sha256 (first 16 hex) of dvc.lock as the stage starts; 'none' before the first repro."""
    lock = root / "dvc.lock"
    return hashlib.sha256(lock.read_bytes()).hexdigest()[:16] if lock.is_file() else "none"


def variant_tags(params: Params, variant: str | None) -> dict[str, str]:
    """Tags parsed from a variant name 'd{depth}' or 'd{depth}/{schedule}' (anything else: just variant)."""
    if not variant:
        return {}
    tags = {"variant": variant}
    m = re.fullmatch(r"d(\d+)(?:/(.+))?", variant)
    if not m:
        return tags
    tags["depth"] = m.group(1)
    if m.group(2):
        sched = m.group(2)
        tags["schedule"] = sched
        steps, size = schedule_steps(params, sched), schedule_size(params, sched)
        if steps is not None:
            tags["steps"] = str(steps)
        if size is not None:
            tags["size"] = f"{size[0]}x{size[1]}"
    return tags


# --------------------------------------------------------------------------- parent run

def parent_run(client, experiment_id: str, run_key: str, root: Path, base_tags: dict[str, str]) -> str:
    """Id of the parent run for this pipeline execution: from the env, found by tag, or created."""
    if os.environ.get("FLEXVAR_PARENT_RUN_ID"):
        return os.environ["FLEXVAR_PARENT_RUN_ID"]
    query = f"tags.pipeline_run_id = '{run_key}' and tags.flexvar_role = 'pipeline'"
    with file_lock(root / ".flexvar" / "pipeline_run.lock"):
        found = client.search_runs([experiment_id], filter_string=query, max_results=1)
        if found:
            return found[0].info.run_id
        name = f"pipeline {time.strftime('%Y-%m-%d %H:%M:%S')}"
        run = client.create_run(experiment_id, run_name=name,
                                tags={**base_tags, "flexvar_role": "pipeline", "pipeline_run_id": run_key})
        return run.info.run_id


# --------------------------------------------------------------------------- loggers
def _param_value(v: Any) -> str:
    s = str(v)
    return s if len(s) <= 6000 else s[:5997] + "..."


class MlflowLogger(RunLogger):
    """RunLogger writing to one MLflow run through MlflowClient (no global active-run state)."""

    def __init__(self, client, run_id: str, parent_run_id: str, tracking_uri: str, experiment_id: str):
        self.client, self.run_id, self.parent_run_id = client, run_id, parent_run_id
        self.tracking_uri, self.experiment_id = tracking_uri, experiment_id
        self.status = "FINISHED"

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, _param_value(v)) for k, v in params.items()]
        for i in range(0, len(items), PARAM_CHUNK):
            self.client.log_batch(self.run_id, params=items[i:i + PARAM_CHUNK])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, int(step or 0)) for k, v in metrics.items() if v is not None]
        for i in range(0, len(items), METRIC_CHUNK):
            self.client.log_batch(self.run_id, metrics=items[i:i + METRIC_CHUNK])

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def set_tags(self, tags: dict[str, Any]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v))

    def close(self) -> None:
        self.client.set_terminated(self.run_id, self.status)
        self.client.set_terminated(self.parent_run_id, self.status)


def parent_logger(logger: RunLogger) -> RunLogger:
    """A logger on the pipeline's parent run of a stage's logger (the report puts its results there too)."""
    if not isinstance(logger, MlflowLogger):
        return UntrackedLogger()
    return MlflowLogger(logger.client, logger.parent_run_id, logger.parent_run_id, logger.tracking_uri,
                        logger.experiment_id)


def summary_run(logger: RunLogger, name: str, tags: dict[str, str]) -> RunLogger:
    """A new top-level run of the same pipeline execution (tags pipeline_run_id, parent_run_id), e.g. one
    FID-vs-steps curve per depth: top level, so the UI's chart view draws it without expanding the parent."""
    if not isinstance(logger, MlflowLogger):
        return UntrackedLogger()
    own = logger.client.get_run(logger.run_id).data.tags
    inherited = {k: own[k] for k in ("git_commit", "pipeline_run_id") if k in own}
    run = logger.client.create_run(logger.experiment_id, run_name=name,
                                   tags={**inherited, **tags, "parent_run_id": logger.parent_run_id})
    curve = MlflowLogger(logger.client, run.info.run_id, run.info.run_id, logger.tracking_uri, logger.experiment_id)
    return curve


class UntrackedLogger(RunLogger):
    """What a stage gets when tracking is off: records nothing, has no run id."""

    run_id = parent_run_id = tracking_uri = experiment_id = None

    def set_tags(self, tags: dict[str, Any]) -> None:
        pass


def runs_page(uri: str, experiment_id: str) -> str:
    """The UI link that opens the experiment's runs table (a server URI is its own UI; a local store's
    UI is `mlflow ui` on its default address)."""
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else MLFLOW_UI_BASE
    return RUNS_PAGE.format(base=base, experiment_id=experiment_id)


def open_run(stage: str, params: Params, param_keys: list[str], tags: dict | None = None,
             variant: str | None = None) -> RunLogger:
    """Start the stage's child run (see `stage_run`); caller closes it."""
    from flexvar.distributed import is_main

    if not is_main():   # multi-worker training (flows/ray_train.py): rank 0 alone tracks
        return UntrackedLogger()
    root = project_root()
    try:
        client, exp_id, uri = open_experiment(params, root)
    except TrackingError as e:
        if params.tracking.required:
            raise
        print(f"[tracking] tracking is off for stage '{stage}': {e}", flush=True)
        return UntrackedLogger()
    key = pipeline_run_id()
    common = {"git_commit": git_commit(root), "pipeline_run_id": key}
    parent_id = parent_run(client, exp_id, key, root, common)
    client.update_run(parent_id, status="RUNNING")
    run_tags = {**common, "dvc_lock_hash": dvc_lock_hash(root), "stage": stage,
                "mlflow.parentRunId": parent_id, **variant_tags(params, variant),
                **{k: str(v) for k, v in (tags or {}).items()}}
    name = f"{stage} {variant}" if variant else stage
    run = client.create_run(exp_id, run_name=name, tags=run_tags)
    logger = MlflowLogger(client, run.info.run_id, parent_id, uri, exp_id)
    logger.log_params(select(params, param_keys))
    print(f"[tracking] {name}: run {run.info.run_id} (parent {parent_id}) in '{params.tracking.experiment}' "
          f"at {uri}; runs page: {runs_page(uri, exp_id)}", flush=True)
    return logger


@contextlib.contextmanager
def stage_run(stage: str, params: Params, param_keys: list[str], tags: dict | None = None,
              variant: str | None = None) -> Iterator[RunLogger]:
    """One MLflow child run for a stage: params = select(params, param_keys); FAILED if the body raises.

    Yields an `MlflowLogger` (or an `UntrackedLogger` when tracking is off and not required).
    """
    logger = open_run(stage, params, param_keys, tags=tags, variant=variant)
    try:
        yield logger
    except BaseException as e:
        if isinstance(logger, MlflowLogger):
            logger.status = "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED"
        raise
    finally:
        logger.close()
