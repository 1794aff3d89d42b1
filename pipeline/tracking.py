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
  - else FLEXVAR_PIPELINE_RUN_ID set: that string is the pipeline run id (the Prefect/Ray flow sets it
    for every stage it runs; tests);
  - else under `dvc repro` / `dvc exp run` (DVC_STAGE is set; dvc gives its stages no per-execution id):
    the dvc process itself, found with psutil (Linux, macOS, Windows): pid + start time of the first
    ancestor without DVC_STAGE in its environment, so every stage of one `dvc repro` shares it and the
    next `dvc repro` gets a new one;
  - else this process alone (a stage run by hand gets its own parent).
The parent is the run tagged `pipeline_run_id=<id>, flexvar_role=pipeline` in the experiment,
created by the first stage (under a file lock in .flexvar/, so concurrent stages make one).
The parent is marked finished after each stage ends, so its end time is the last stage's.

Every run carries MLflow's standard tags (mlflow.user, mlflow.source.name/type, mlflow.source.git.commit,
mlflow.runName: `standard_tags`, resolved by MLflow's own run-context registry, as `mlflow.start_run`
does). Training stages record system metrics (MLflow's SystemMetricsMonitor: CPU, memory, GPU) and log
their model with `mlflow.pytorch.log_model` (a signature, registered as `flexvar-d{depth}` /
`flexvar-tokenizer`, the version tagged with the weights' sha256); `evaluate` tags the version its
samples came from with its FID (`tag_model_version`). `prepare` logs the dataset with `log_input`.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator, NamedTuple

from flexvar.config import Params, select
from flexvar.errors import FlexvarError
from flexvar.run_logger import RunLogger
from flexvar.schedules import schedule_size, schedule_steps

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
SYSTEM_METRICS_INTERVAL_S = 5.0   # training stages: one system/* sample every 5 s
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


def _dvc_process_key() -> str | None:
    """'<pid>-<start time>' of the dvc process running this stage: the first ancestor without
    DVC_STAGE in its environment (psutil: portable); None when it cannot be read."""
    import psutil

    try:
        for proc in psutil.Process(os.getpid()).parents():
            if "DVC_STAGE" not in proc.environ():
                return f"{proc.pid}-{int(proc.create_time() * 1000)}"
    except (psutil.Error, OSError):
        return None
    return None


def pipeline_run_id() -> str:
    """The id shared by all stages of one pipeline execution (see the module docstring)."""
    import psutil

    if os.environ.get("FLEXVAR_PIPELINE_RUN_ID"):
        return os.environ["FLEXVAR_PIPELINE_RUN_ID"]
    if os.environ.get("DVC_STAGE"):
        key = _dvc_process_key()
        if key is not None:
            return f"dvc-{key}"
    me = psutil.Process(os.getpid())
    return f"proc-{me.pid}-{int(me.create_time() * 1000)}"


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


def standard_tags(root: Path, run_name: str) -> dict[str, str]:
    """MLflow's standard run tags as `mlflow.start_run` sets them (its run-context registry: mlflow.user,
    mlflow.source.name, mlflow.source.type, and mlflow.source.git.commit where the entry point is in a
    git checkout), with the project's commit and the run name made explicit."""
    from mlflow.tracking.context.registry import resolve_tags
    from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT, MLFLOW_RUN_NAME, MLFLOW_SOURCE_NAME, MLFLOW_USER

    tags = dict(resolve_tags())
    tags.setdefault(MLFLOW_USER, os.environ.get("USER") or os.environ.get("USERNAME") or "unknown")
    tags.setdefault(MLFLOW_SOURCE_NAME, " ".join(["python", *sys.argv])[:500])
    commit = git_commit(root)
    if commit != "unknown":
        tags[MLFLOW_GIT_COMMIT] = commit.removesuffix("-dirty")
    tags[MLFLOW_RUN_NAME] = run_name
    return tags


def create_run(client, experiment_id: str, root: Path, run_name: str, tags: dict[str, str]):
    """client.create_run with MLflow's standard tags under `tags` (one way every run of the project is made)."""
    return client.create_run(experiment_id, run_name=run_name, tags={**standard_tags(root, run_name), **tags})


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
        run = create_run(client, experiment_id, root, name,
                         {**base_tags, "flexvar_role": "pipeline", "pipeline_run_id": run_key})
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
        self.monitor = None    # MLflow's SystemMetricsMonitor on training stages (`system_metrics`)

    def system_metrics(self, interval_s: float | None = None) -> None:
        """Record CPU/memory/disk/network (and GPU where there is one) as `system/*` metrics until close,
        one sample every SYSTEM_METRICS_INTERVAL_S (MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL overrides)."""
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        interval_s = interval_s or float(os.environ.get("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL")
                                         or SYSTEM_METRICS_INTERVAL_S)
        self.monitor = SystemMetricsMonitor(self.run_id, sampling_interval=interval_s, samples_before_logging=1,
                                            tracking_uri=self.tracking_uri)
        self.monitor.start()

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

    def log_input(self, dataset, name: str, source: str, context: str) -> None:
        """A Hugging Face `datasets.Dataset` (the prepared split) as an input of the run, as `mlflow.log_input`
        records it: name, source, digest (of its first rows and fingerprint), schema and row count."""
        import warnings

        import mlflow.data
        from mlflow.entities import DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        with warnings.catch_warnings():   # schema inference's hint about integer labels
            warnings.simplefilter("ignore", UserWarning)
            entity = mlflow.data.from_huggingface(dataset, path=source, name=name)._to_mlflow_entity()
        self.client.log_inputs(self.run_id, [DatasetInput(entity, [InputTag(MLFLOW_DATASET_CONTEXT, context)])])

    def log_model(self, model, name: str, registered_name: str, signature, version_tags: dict[str, str]):
        """`mlflow.pytorch.log_model` on this run, registered as `registered_name`; returns the version.

        Requirements are given (not inferred: inference imports the model in a subprocess, slow), and the
        weights are pickled with the model's class, so `mlflow.pytorch.load_model` needs flexvar installed."""
        import mlflow
        import mlflow.pytorch
        import torch

        mlflow.set_tracking_uri(self.tracking_uri)
        model = copy.deepcopy(model).to("cpu").eval()   # loads anywhere; the stage's model is left as it is
        reqs = [f"torch=={torch.__version__.split('+')[0]}", "einops", "flexvar-pipeline"]
        with mlflow.start_run(run_id=self.run_id):
            info = mlflow.pytorch.log_model(model, name=name, signature=signature, pip_requirements=reqs,
                                            serialization_format="pickle",   # any forward, no tracing
                                            registered_model_name=registered_name, await_registration_for=60)
        self.client.update_run(self.run_id, status="RUNNING")   # the stage is not over; close() ends it
        version = str(info.registered_model_version)
        for k, v in version_tags.items():
            self.client.set_model_version_tag(registered_name, version, k, str(v))
        return version

    def close(self) -> None:
        if self.monitor is not None:
            self.monitor.finish()
        self.client.set_terminated(self.run_id, self.status)
        self.client.set_terminated(self.parent_run_id, self.status)


def parent_logger(logger: RunLogger) -> RunLogger:
    """A logger on the pipeline's parent run of a stage's logger (the report puts its results there too)."""
    if not isinstance(logger, MlflowLogger):
        return UntrackedLogger()
    return MlflowLogger(logger.client, logger.parent_run_id, logger.parent_run_id, logger.tracking_uri,
                        logger.experiment_id)


def model_signature(inputs: dict[str, tuple[str, tuple[int, ...]]], output: tuple[str, tuple[int, ...]]):
    """An MLflow ModelSignature of tensors: inputs {name: (numpy dtype, shape)} (-1 = any), one output."""
    import numpy as np
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    return ModelSignature(inputs=Schema([TensorSpec(np.dtype(dt), shape, name) for name, (dt, shape) in inputs.items()]),
                          outputs=Schema([TensorSpec(np.dtype(output[0]), output[1])]))


def registered_name(depth: int | None) -> str:
    """The model registry name: `flexvar-d{depth}` per transformer depth, `flexvar-tokenizer`."""
    return "flexvar-tokenizer" if depth is None else f"flexvar-d{depth}"


def log_transformer(logger: RunLogger, model, depth: int, weights_sha256: str, tags: dict[str, Any]) -> str | None:
    """The trained FlexVAR as an MLflow model (signature: its teacher-forced forward), registered as
    `flexvar-d{depth}`; the version is tagged with the weights' sha256 (evaluate finds it by that)."""
    sig = model_signature({"label_B": ("int64", (-1,)), "x_BLCv": ("float32", (-1, -1, model.codebook_dim))},
                          ("float32", (-1, -1, model.vocab_size)))
    return logger.log_model(model, "transformer", registered_name(depth), sig,
                            {"weights_sha256": weights_sha256, "depth": depth, **tags})


def log_tokenizer(logger: RunLogger, model, weights_sha256: str, tags: dict[str, Any]) -> str | None:
    """The trained VQVAE as an MLflow model (signature: image -> reconstruction, `VQVAE.reconstruct`),
    registered as `flexvar-tokenizer`, the version tagged with the checkpoint's sha256."""
    sig = model_signature({"image_BCHW": ("float32", (-1, 3, -1, -1))}, ("float32", (-1, 3, -1, -1)))
    return logger.log_model(model, "tokenizer", registered_name(None), sig, {"weights_sha256": weights_sha256, **tags})


def tag_model_version(logger: RunLogger, depth: int, weights_sha256: str, tags: dict[str, Any]) -> str | None:
    """Tag the registered `flexvar-d{depth}` version whose weights have this sha256 (e.g. with its FID);
    its version number, or None (untracked, or no such version: trained while tracking was off)."""
    if not isinstance(logger, MlflowLogger) or not weights_sha256:
        return None
    name = registered_name(depth)
    found = logger.client.search_model_versions(f"name = '{name}' and tags.weights_sha256 = '{weights_sha256}'")
    if not found:
        return None
    version = max(found, key=lambda v: int(v.version)).version
    for k, v in tags.items():
        logger.client.set_model_version_tag(name, version, k, str(v))
    return version


class UntrackedLogger(RunLogger):
    """What a stage gets when tracking is off: records nothing, has no run id."""

    run_id = parent_run_id = tracking_uri = experiment_id = None

    def set_tags(self, tags: dict[str, Any]) -> None:
        pass

    def system_metrics(self, interval_s: float | None = None) -> None:
        pass

    def log_input(self, dataset, name: str, source: str, context: str) -> None:
        pass

    def log_model(self, model, name: str, registered_name: str, signature, version_tags: dict[str, str]) -> None:
        return None


def runs_page(uri: str, experiment_id: str) -> str:
    """The UI link that opens the experiment's runs table (a server URI is its own UI; a local store's
    UI is `mlflow ui` on its default address)."""
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else MLFLOW_UI_BASE
    return RUNS_PAGE.format(base=base, experiment_id=experiment_id)


def open_run(stage: str, params: Params, param_keys: list[str], tags: dict | None = None,
             variant: str | None = None, system_metrics: bool = False) -> RunLogger:
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
    run = create_run(client, exp_id, root, name, run_tags)
    logger = MlflowLogger(client, run.info.run_id, parent_id, uri, exp_id)
    logger.log_params(select(params, param_keys))
    if system_metrics:
        logger.system_metrics()
    print(f"[tracking] {name}: run {run.info.run_id} (parent {parent_id}) in '{params.tracking.experiment}' "
          f"at {uri}; runs page: {runs_page(uri, exp_id)}", flush=True)
    return logger


@contextlib.contextmanager
def stage_run(stage: str, params: Params, param_keys: list[str], tags: dict | None = None,
              variant: str | None = None, system_metrics: bool = False) -> Iterator[RunLogger]:
    """One MLflow child run for a stage: params = select(params, param_keys); FAILED if the body raises.
    `system_metrics`: MLflow's system metrics (system/cpu_utilization_percentage, ...) while it runs.

    Yields an `MlflowLogger` (or an `UntrackedLogger` when tracking is off and not required).
    """
    logger = open_run(stage, params, param_keys, tags=tags, variant=variant, system_metrics=system_metrics)
    try:
        yield logger
    except BaseException as e:
        if isinstance(logger, MlflowLogger):
            logger.status = "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED"
        raise
    finally:
        logger.close()
