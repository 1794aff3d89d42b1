"""pipeline/tracking.py against real MLflow: a `mlflow server` process, the embedded SQLite store,
and a real `dvc repro` whose stages must share one parent run."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from flexvar.config import load_params_dict, select
from flows.cluster import free_port
from pipeline.common import set_offline_env
from pipeline.tracking import TrackingError, UntrackedLogger, runs_page, stage_run

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
VARIANTS = [("d2/short", ["transformer", "sample.schedules.short"]), ("d4/large", ["sample", "seed"])]

# A stage as DVC would run it: its own process, params from params.yaml, a metric curve, an artifact.
STAGE_SCRIPT = textwrap.dedent("""
    import sys
    from pathlib import Path
    from flexvar.config import load_params
    from pipeline.tracking import stage_run

    stage, variant, keys = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
    params = load_params("params.yaml")
    with stage_run(stage, params, keys, tags={"extra": "yes"}, variant=variant) as log:
        for step in range(3):
            log.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
        out = Path("out") / (variant.replace("/", "_") + ".json")
        out.parent.mkdir(exist_ok=True)
        out.write_text('{"fid_domain": 1.5}')
        log.log_metrics({"fid_domain": 1.5})
        log.log_artifact(out, "metrics")
""")


def _env(**extra) -> dict[str, str]:
    set_offline_env()
    env = {k: v for k, v in os.environ.items()
           if k not in {"MLFLOW_TRACKING_URI", "FLEXVAR_PIPELINE_RUN_ID", "FLEXVAR_PARENT_RUN_ID", "DVC_STAGE"}}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on a free localhost port, stopped at the end of the session."""
    d = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    env = _env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    cmd = [str(Path(PY).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1", "--backend-store-uri", f"sqlite:///{d / 'server.db'}",
           "--artifacts-destination", str(d / "artifacts")]
    log = open(d / "server.log", "w")
    proc = subprocess.Popen(cmd, cwd=d, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    for _ in range(240):
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited: {(d / 'server.log').read_text()[-2000:]}")
        try:
            if urllib.request.urlopen(f"{uri}/health", timeout=1).status == 200:
                break
        except OSError:
            time.sleep(0.5)
    else:
        raise RuntimeError("mlflow server did not become healthy in 120 s")
    yield uri
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    log.close()


def _project(tmp_path: Path, tracking: dict | None = None) -> Path:
    """A minimal project folder: params.yaml and the stage script."""
    data = {"tracking": tracking or {"experiment": "test"}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(data))
    (tmp_path / "stage.py").write_text(STAGE_SCRIPT)
    return tmp_path


def _run_stage(project: Path, stage: str, variant: str, keys: list[str], env: dict[str, str]) -> None:
    subprocess.run([PY, "stage.py", stage, variant, ",".join(keys)], cwd=project, env=env, check=True)


def _runs(uri: str, experiment: str = "test"):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    return client, client.search_runs([exp.experiment_id], max_results=1000)


def _check_pipeline(uri: str, pipeline_id: str) -> dict[str, object]:
    """One parent tagged with the pipeline id, the two variants as its children with tags/params/metrics."""
    client, runs = _runs(uri)
    mine = [r for r in runs if r.data.tags.get("pipeline_run_id") == pipeline_id]
    parents = [r for r in mine if r.data.tags.get("flexvar_role") == "pipeline"]
    assert len(parents) == 1, [r.data.tags for r in mine]
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    children = {r.data.tags["variant"]: r for r in mine if r is not parent}
    assert set(children) == {v for v, _ in VARIANTS}
    params = load_params_dict({"tracking": {"experiment": "test"}})
    for variant, keys in VARIANTS:
        run = children[variant]
        tags = run.data.tags
        assert tags["mlflow.parentRunId"] == parent.info.run_id
        assert tags["stage"] == "sample" and tags["extra"] == "yes"
        assert tags["git_commit"] and tags["dvc_lock_hash"]
        assert run.data.params == {k: str(v) for k, v in select(params, keys).items()}
        assert run.data.metrics["fid_domain"] == 1.5
        assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [0, 1, 2]
        assert [a.path for a in client.list_artifacts(run.info.run_id, "metrics")] == [
            f"metrics/{variant.replace('/', '_')}.json"]
        assert run.info.status == "FINISHED"
    assert children["d2/short"].data.tags["depth"] == "2"
    assert children["d2/short"].data.tags["steps"] == "4"
    assert children["d4/large"].data.tags["size"] == "32x32"        # the default large: 2x the 16 px training size
    assert children["d4/large"].data.tags["steps"] == "8"
    return children


@pytest.mark.slow   # a real mlflow server process
def test_server_two_variants_share_parent(mlflow_server, tmp_path):
    project = _project(tmp_path)
    env = _env(MLFLOW_TRACKING_URI=mlflow_server, FLEXVAR_PIPELINE_RUN_ID="server-pipeline-1")
    for variant, keys in VARIANTS:
        _run_stage(project, "sample", variant, keys, env)
    _check_pipeline(mlflow_server, "server-pipeline-1")


@pytest.mark.slow   # stage subprocesses
def test_embedded_store_two_variants_share_parent(tmp_path):
    project = _project(tmp_path)
    env = _env(FLEXVAR_PIPELINE_RUN_ID="embedded-pipeline-1")
    for variant, keys in VARIANTS:
        _run_stage(project, "sample", variant, keys, env)
    assert (project / "mlflow.db").is_file()
    children = _check_pipeline(f"sqlite:///{project / 'mlflow.db'}", "embedded-pipeline-1")
    # the embedded store keeps artifacts inside the project
    assert children["d2/short"].info.artifact_uri.startswith((project / "mlartifacts").as_uri())
    assert list((project / "mlartifacts").rglob("d2_short.json"))


@pytest.mark.slow   # real dvc repro
def test_dvc_repro_stages_share_one_parent_per_execution(tmp_path):
    """Two stages of one real `dvc repro` hang under one parent; the next `dvc repro` gets a new one."""
    project = _project(tmp_path)
    stages = {f"s{i}": {"cmd": f"{PY} stage.py sample {variant} {','.join(keys)}",
                        "deps": ["stage.py"] + (["out/d2_short.json"] if i else []),
                        "outs": [{f"out/{variant.replace('/', '_')}.json": {"cache": False}}]}
              for i, (variant, keys) in enumerate(VARIANTS)}
    (project / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}))
    env = _env(DVC_NO_ANALYTICS="1", DVC_SITE_CACHE_DIR=str(tmp_path / ".dvc_site"))
    dvc = str(Path(PY).parent / "dvc")
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    subprocess.run([dvc, "init", "-q"], cwd=project, env=env, check=True)
    for _ in range(2):
        subprocess.run([dvc, "repro", "-f", "-q"], cwd=project, env=env, check=True)
    _, runs = _runs(f"sqlite:///{project / 'mlflow.db'}")
    parents = [r for r in runs if r.data.tags.get("flexvar_role") == "pipeline"]
    assert len(parents) == 2 and all(r.data.tags["pipeline_run_id"].startswith("dvc-") for r in parents)
    for parent in parents:
        kids = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        assert sorted(r.data.tags["variant"] for r in kids) == ["d2/short", "d4/large"]


def test_unreachable_server_fails_naming_uri(monkeypatch):
    uri = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    params = load_params_dict({"tracking": {"experiment": "test"}})
    ran = []
    with pytest.raises(TrackingError, match=f"{uri} is unreachable.*tracking.required: false"):
        with stage_run("train_tokenizer", params, ["seed"]):
            ran.append(True)
    assert not ran


def test_unreachable_server_not_required_runs_untracked(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"http://127.0.0.1:{free_port()}"
    params = load_params_dict({"tracking": {"uri": uri, "required": False}})
    with stage_run("train_tokenizer", params, ["seed"]) as log:
        assert isinstance(log, UntrackedLogger) and log.run_id is None
        log.log_metrics({"loss": 1.0}, step=0)
    out = capsys.readouterr().out
    assert "tracking is off" in out and uri in out
    assert not (tmp_path / "mlflow.db").exists()


def test_failed_stage_marks_run_failed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for key in ("MLFLOW_TRACKING_URI", "DVC_ROOT", "FLEXVAR_PARENT_RUN_ID"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("FLEXVAR_PIPELINE_RUN_ID", "failing")
    params = load_params_dict({"tracking": {"experiment": "test"}})
    with pytest.raises(ZeroDivisionError):
        with stage_run("evaluate", params, ["evaluate"], variant="d2/short") as log:
            run_id = log.run_id
            1 / 0
    client, _ = _runs(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(run_id)
    assert run.info.status == "FAILED"
    assert client.get_run(run.data.tags["mlflow.parentRunId"]).info.status == "FAILED"


def test_runs_page_link_sets_the_model_training_view():
    """MLflow 3 takes its GenAI / Model training switch from the URL before browser storage; a local
    store's UI is `mlflow ui` at its default address, a server is its own UI."""
    assert runs_page("sqlite:////p/mlflow.db", "1") == \
        "http://127.0.0.1:5000/#/experiments/1/runs?workflowType=machine_learning"
    assert runs_page("http://tracking.example:8080/", "7") == \
        "http://tracking.example:8080/#/experiments/7/runs?workflowType=machine_learning"


# Stages as the pipeline runs them, in a git checkout: prepare logs its dataset, train_transformer its
# model (registered per depth) with system metrics, evaluate tags the version its samples came from.
MODEL_SCRIPT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import datasets
    from flexvar.checkpoint import file_sha256
    from flexvar.config import load_params
    from flexvar.transformer.checkpoint import save_flexvar
    from pipeline.tracking import log_transformer, stage_run, tag_model_version
    from tests.tiny_checkpoint import tiny_models

    params = load_params("params.yaml")
    stage = sys.argv[1]
    if stage == "prepare":
        with stage_run("prepare", params, ["seed"]) as log:
            ds = datasets.Dataset.from_dict({"label": [0, 1, 2, 3], "x": [0.5, 1.5, 2.5, 3.5]})
            log.log_input(ds, "builtin:test/train", "builtin:test", "train")
    elif stage == "train":
        depth, seed = int(sys.argv[2]), int(sys.argv[3])
        with stage_run("train_transformer", params, ["seed"], variant=f"d{depth}", system_metrics=True) as log:
            model, _ = tiny_models(seed=seed)
            path = save_flexvar(f"models/d{depth}_{seed}", model, latent_hw=(8, 8), downsample=2, tokenizer_dir="tok")
            time.sleep(2.5)                                 # the monitor samples every second here
            print("VERSION", log_transformer(log, model, depth, file_sha256(path), {"val_loss": 1.25}))
    else:
        depth, seed = int(sys.argv[2]), int(sys.argv[3])
        sha = file_sha256(f"models/d{depth}_{seed}/flexvar.pt")
        with stage_run("evaluate", params, ["seed"], variant=f"d{depth}/short") as log:
            print("TAGGED", tag_model_version(log, depth, sha, {"fid_domain/short": 3.5}))
""")


@pytest.mark.slow   # a real mlflow server process, stage subprocesses
def test_standard_tags_registered_models_dataset_and_system_metrics(mlflow_server, tmp_path, monkeypatch):
    import mlflow.pytorch
    from mlflow import MlflowClient

    import pipeline.tracking as tracking

    project = tmp_path / "proj"
    project.mkdir()
    (project / "params.yaml").write_text(yaml.safe_dump({"tracking": {"experiment": "models"}}))
    (project / "stage.py").write_text(MODEL_SCRIPT)
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    subprocess.run(git + ["add", "-A"], cwd=project, check=True)
    subprocess.run(git + ["commit", "-qm", "x"], cwd=project, check=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project, capture_output=True, text=True).stdout.strip()
    env = _env(MLFLOW_TRACKING_URI=mlflow_server, FLEXVAR_PIPELINE_RUN_ID="models-1",
               MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL="1")
    out = {}
    # d2 trained twice: evaluate's samples come from the first, which is not the latest version
    for args in (["prepare"], ["train", "2", "2"], ["train", "4", "4"], ["train", "2", "7"], ["evaluate", "2", "2"]):
        r = subprocess.run([PY, "stage.py", *args], cwd=project, env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-3000:]
        out[" ".join(args)] = r.stdout
    assert "VERSION 1" in out["train 2 2"] and "VERSION 1" in out["train 4 4"] and "VERSION 2" in out["train 2 7"]
    assert "TAGGED 1" in out["evaluate 2 2"]

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)   # for the fluent model API below
    client = MlflowClient(tracking_uri=mlflow_server)
    exp = client.get_experiment_by_name("models")
    runs = client.search_runs([exp.experiment_id], "tags.pipeline_run_id = 'models-1'")
    assert len(runs) == 6   # the parent and five stages
    for run in runs:
        tags = run.data.tags
        assert tags["mlflow.user"] and tags["mlflow.source.type"] == "LOCAL", tags
        assert tags["mlflow.source.name"].endswith("stage.py"), tags
        assert tags["mlflow.source.git.commit"] == head
        assert tags["mlflow.runName"] == run.info.run_name
    by_stage = {(r.data.tags.get("stage"), r.data.tags.get("variant")): r for r in runs}   # d2: the later run
    trains = sorted((r for r in runs if r.data.tags.get("stage") == "train_transformer"), key=lambda r: r.info.start_time)

    # the prepared dataset as a run input
    inputs = client.get_run(by_stage[("prepare", None)].info.run_id).inputs.dataset_inputs
    assert [(i.dataset.name, i.dataset.source_type) for i in inputs] == [("builtin:test/train", "hugging_face")]
    assert inputs[0].dataset.digest and '"num_rows": 4' in inputs[0].dataset.profile
    assert [(t.key, t.value) for t in inputs[0].tags] == [("mlflow.data.context", "train")]

    # one registered model per depth, its version from the training run, with signature and tags
    for depth, train_run, number in ((2, trains[0], "1"), (4, trains[1], "1"), (2, trains[2], "2")):
        version = client.get_model_version(f"flexvar-d{depth}", number)
        assert version.run_id == train_run.info.run_id
        assert version.tags["weights_sha256"] and version.tags["depth"] == str(depth)
        info = mlflow.models.get_model_info(version.source)
        assert [i["name"] for i in info.signature.inputs.to_dict()] == ["label_B", "x_BLCv"]
        system = [k for k in client.get_run(train_run.info.run_id).data.metrics if k.startswith("system/")]
        assert "system/cpu_utilization_percentage" in system, system
    d2 = client.get_model_version("flexvar-d2", "1")
    assert d2.tags["fid_domain/short"] == "3.5"
    assert "fid_domain/short" not in client.get_model_version("flexvar-d2", "2").tags   # other weights: untouched
    assert "fid_domain/short" not in client.get_model_version("flexvar-d4", "1").tags
    loaded = mlflow.pytorch.load_model("models:/flexvar-d2/1")
    assert type(loaded).__name__ == "FlexVAR" and loaded.vocab_size == 32
    assert tracking.registered_name(2) == "flexvar-d2"
