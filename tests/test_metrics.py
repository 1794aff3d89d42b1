"""flexvar.evaluation.metrics on tiny real data (a prepared split, a feature net trained a few steps), and the
train_feature_net -> reference_stats -> evaluate -> report stages end to end on the embedded MLflow store."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from flexvar.config import EvaluateConfig
from flexvar.data.splits import load_split
from flexvar.evaluation.feature_net import load_feature_net, save_feature_net, train_feature_net
from flexvar.evaluation.metrics import MetricsError, compute_metrics, compute_reference, load_samples

CPU = torch.device("cpu")
DOMAIN_KEYS = {"fid_domain", "isc_domain", "isc_std_domain", "kid_domain", "kid_std_domain",
               "precision_domain", "recall_domain", "f_score_domain"}


def _cfg(**kw) -> EvaluateConfig:
    return EvaluateConfig(**{"kid_subset_size": 20, **kw})


@pytest.fixture(scope="session")
def feature_net(tiny_prepared, tmp_path_factory):
    """A feature net trained for a few steps on the tiny prepared split, saved as a checkpoint."""
    train, val = load_split(tiny_prepared, "train"), load_split(tiny_prepared, "val")
    model, metrics = train_feature_net(train, val, steps=30, batch_size=32, lr=2e-3, device=CPU, seed=0)
    path = tmp_path_factory.mktemp("feature_net") / "model.pt"
    save_feature_net(model, path, metrics)
    return path


@pytest.fixture(scope="session")
def reference(tiny_prepared, feature_net, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "domain"
    info = compute_reference(load_split(tiny_prepared, "val").images_NCHW, out, _cfg(), feature_net, CPU, seed=0)
    return out, info


def test_feature_net_roundtrip_and_any_input_size(feature_net):
    net = load_feature_net(feature_net)
    images = torch.randint(0, 256, (3, 3, 48, 40), dtype=torch.uint8)
    features_BD, logits_BK = net(net.to_input(images))
    assert features_BD.shape == (3, net.config["feature_dim"]) and logits_BK.shape == (3, 8)
    assert torch.load(feature_net, weights_only=True)["metrics"]["val_accuracy"] > 2 / 8   # chance is 1/8


def test_reference_cached_once_and_self_consistent(reference):
    out, info = reference
    # precision/recall against itself are 1 by construction: not computed (N^2 distances), features cached
    assert set(info["self_metrics"]) == DOMAIN_KEYS - {"precision_domain", "recall_domain", "f_score_domain"}
    assert abs(info["self_metrics"]["fid_domain"]) < 1e-4          # reference against itself
    cached = sorted(p.name for p in out.glob("*.pt"))
    assert any("features-features" in n for n in cached) and any("stat-fid" in n for n in cached)


def test_metrics_named_by_space_and_real_beats_noise(tiny_prepared, feature_net, reference):
    out, _ = reference
    real = load_split(tiny_prepared, "train").images_NCHW[:64]
    noise = torch.randint(0, 256, (64, 3, 48, 48), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    m_real = compute_metrics(real, out, _cfg(), feature_net, CPU, seed=0)
    m_noise = compute_metrics(noise, out, _cfg(), feature_net, CPU, seed=0)   # 48 px: resized to 32
    assert set(m_real) == set(m_noise) == DOMAIN_KEYS
    assert "fid" not in m_real and all(k.endswith("_domain") for k in m_real)
    assert m_real["fid_domain"] < m_noise["fid_domain"]
    assert m_real["kid_domain"] < m_noise["kid_domain"]
    assert m_real == compute_metrics(real, out, _cfg(), feature_net, CPU, seed=0)   # deterministic


def test_missing_reference_cache_is_a_clear_error(feature_net, tmp_path):
    with pytest.raises(MetricsError, match="reference_stats"):
        compute_metrics(torch.zeros(4, 3, 32, 32, dtype=torch.uint8), tmp_path, _cfg(), feature_net, CPU, seed=0)


@pytest.mark.parametrize("weights", ["", "/nonexistent/weights-inception.pth"])
def test_inception_weights_missing_names_the_param(weights, tmp_path):
    cfg = _cfg(feature_space="inception", inception_weights=weights)
    images = torch.zeros(4, 3, 32, 32, dtype=torch.uint8)
    with pytest.raises(MetricsError, match=r"evaluate\.inception_weights") as err:
        compute_reference(images, tmp_path, cfg, None, CPU, seed=0)
    assert "feature_space: domain" in str(err.value)
    assert not list(tmp_path.iterdir())   # failed before anything was written or downloaded


def test_metric_subset_fid_only(tiny_prepared, feature_net, tmp_path):
    cfg = _cfg(metrics=["fid"])
    val = load_split(tiny_prepared, "val").images_NCHW
    compute_reference(val, tmp_path, cfg, feature_net, CPU, seed=0)
    assert set(compute_metrics(val[:16], tmp_path, cfg, feature_net, CPU, seed=0)) == {"fid_domain"}


def test_inception_space_from_local_weights_only(tmp_path, monkeypatch):
    """inception-v3-compat with weights read from evaluate.inception_weights (random weights here: the
    real file is a download); keys end in _inception."""
    import torch_fidelity.feature_extractor_inceptionv3 as tfi

    torch.save({}, tmp_path / "empty.pth")
    with monkeypatch.context() as m:   # build the module without its weights, to save random ones
        m.setattr(tfi.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None)
        m.setattr(tfi, "load_state_dict_from_url", lambda *a, **k: pytest.fail("tried to download"))
        torch.manual_seed(0)
        net = tfi.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                              feature_extractor_weights_path=str(tmp_path / "empty.pth"))
    torch.save(net.state_dict(), tmp_path / "weights.pth")
    monkeypatch.setattr(tfi, "load_state_dict_from_url", lambda *a, **k: pytest.fail("tried to download"))
    cfg = _cfg(feature_space="inception", inception_weights=str(tmp_path / "weights.pth"), kid_subset_size=4)
    gen = torch.Generator().manual_seed(0)
    ref = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8, generator=gen)   # 299 px inside: keep tiny
    compute_reference(ref, tmp_path / "ref", cfg, None, CPU, seed=0)
    metrics = compute_metrics(ref.flip(-1), tmp_path / "ref", cfg, None, CPU, seed=0)
    assert set(metrics) == {k.replace("_domain", "_inception") for k in DOMAIN_KEYS}


def test_load_samples_adm_layout(tmp_path):
    images_NHWC = np.random.default_rng(0).integers(0, 256, (5, 12, 10, 3), dtype=np.uint8)
    np.savez(tmp_path / "samples.npz", images_NHWC, labels=np.arange(5))
    images_NCHW, labels = load_samples(tmp_path / "samples.npz")
    assert images_NCHW.shape == (5, 3, 12, 10) and images_NCHW.dtype == torch.uint8
    assert torch.equal(images_NCHW[2].permute(1, 2, 0), torch.from_numpy(images_NHWC[2]))
    assert labels.tolist() == [0, 1, 2, 3, 4]


# --------------------------------------------------------------------------- stages, end to end
PARAMS = {
    "data": {"resolution": 32},
    "tokenizer": {"ch_mult": [1, 2, 2, 4]},   # 4x4 latent
    "schedule": {"canonical": [1, 2, 3, 4], "head": [1, 2], "groups": [[1, 3, 3]]},
    "sample": {"schedules": {"short": {"steps": 2}, "mid": {"steps": 3}, "large": {"steps": 3, "size": [48, 48]}}},
    "variants": {"depths": [2], "schedules": ["short", "mid", "large"]},
    "sweep": {"eval_panel": {"short": {"steps": 2}, "mid": {"steps": 3}}},
    "evaluate": {"feature_net_steps": 20, "feature_net_batch_size": 32, "kid_subset_size": 20},
    "tracking": {"experiment": "stages"},
}


@pytest.mark.slow   # four pipeline stages end to end
def test_stages_end_to_end(tiny_prepared, tmp_path, monkeypatch):
    from pipeline import evaluate, reference_stats, report, train_feature_net

    monkeypatch.chdir(tmp_path)
    for key in ("MLFLOW_TRACKING_URI", "DVC_ROOT", "FLEXVAR_PARENT_RUN_ID"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("FLEXVAR_PIPELINE_RUN_ID", "metrics-e2e")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    prep = ["--prepared", str(tiny_prepared)]
    assert train_feature_net.main(prep) == 0
    assert json.loads((tmp_path / "metrics/feature_net.json").read_text())["val_accuracy"] > 0
    assert reference_stats.main(prep) == 0
    real = load_split(tiny_prepared, "val")
    rng = np.random.default_rng(0)
    for sched, images_NHWC in {"short": rng.integers(0, 256, (32, 32, 32, 3), dtype=np.uint8),
                               "mid": real.images_NCHW[:32].permute(0, 2, 3, 1).numpy(),
                               "large": rng.integers(0, 256, (32, 48, 48, 3), dtype=np.uint8)}.items():
        (tmp_path / f"samples/d2/{sched}").mkdir(parents=True)
        labels_N = real.labels_N[:32].numpy() if sched == "mid" else np.zeros(32, np.int64)
        np.savez(tmp_path / f"samples/d2/{sched}/samples.npz", images_NHWC, labels=labels_N)
        assert evaluate.main(["--depth", "2", "--schedule", sched]) == 0
    assert report.main([]) == 0

    table = json.loads((tmp_path / "reports/fid_table.json").read_text())
    assert [(r["schedule"], r["steps"], r["size"]) for r in table["rows"]] == [
        ("short", 2, "32x32"), ("mid", 3, "32x32"), ("large", 3, "48x48")]
    by = {r["schedule"]: r for r in table["rows"]}
    assert by["mid"]["fid_domain"] < by["short"]["fid_domain"]      # real images beat noise
    val_accuracy = json.loads((tmp_path / "metrics/feature_net.json").read_text())["val_accuracy"]
    for r in table["rows"]:   # class accuracy and 95% bootstrap intervals per variant, the real-image ceiling
        assert r["fid_domain_ci_low"] < r["fid_domain"] < r["fid_domain_ci_high"]
        assert r["class_acc_domain_ci_low"] <= r["class_acc_domain"] <= r["class_acc_domain_ci_high"]
        assert r["class_acc_domain_real"] == val_accuracy and r["num_samples"] == 32
    md = (tmp_path / "reports/fid_table.md").read_text()
    assert "fid_domain" in md and "| d2 | large | 3 | 48x48 |" in md
    mid = by["mid"]
    fmt = {k: (f"{mid[k]:.4f}" if abs(mid[k]) < 10 else f"{mid[k]:.2f}") for k in mid if k.startswith("fid_domain")}
    assert (f"| {fmt['fid_domain']} [{fmt['fid_domain_ci_low']}, {fmt['fid_domain_ci_high']}] | "
            f"{mid['class_acc_domain']:.4f} [") in md
    assert f"real val images: {val_accuracy:.4f}" in md
    for png in ("fid_vs_steps.png", "class_acc_vs_steps.png"):
        assert (tmp_path / "reports" / png).stat().st_size > 1000
    assert (tmp_path / "reports/fid_vs_steps.csv").read_text().splitlines()[:2] == [
        "line,depth,schedule,steps,size,fid_domain", f"d2,2,short,2,32x32,{by['short']['fid_domain']}"]

    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("stages")
    runs = client.search_runs([exp.experiment_id], "tags.stage = 'evaluate'")
    assert sorted(r.data.tags["variant"] for r in runs) == ["d2/large", "d2/mid", "d2/short"]
    assert all(r.data.tags["feature_space"] == "domain" and "fid_domain" in r.data.metrics for r in runs)
    assert all({"class_acc_domain", "class_acc_domain_real", "fid_domain_ci_low", "fid_domain_ci_high",
                "class_acc_domain_ci_low", "class_acc_domain_ci_high"} <= set(r.data.metrics) for r in runs)
    report_run = client.search_runs([exp.experiment_id], "tags.stage = 'report'")[0]
    assert report_run.data.metrics["class_acc_domain_d2_mid"] == mid["class_acc_domain"]
    assert report_run.data.metrics["fid_domain_ci_high_d2_mid"] == mid["fid_domain_ci_high"]
    parents = {r.data.tags["mlflow.parentRunId"] for r in client.search_runs([exp.experiment_id], "tags.stage != ''")}
    assert len(parents) == 1


def test_metric_subset_prc_only(tiny_prepared, feature_net, tmp_path):
    """The reference skips precision/recall against itself but still caches the features they read."""
    cfg = _cfg(metrics=["prc"])
    val = load_split(tiny_prepared, "val").images_NCHW
    compute_reference(val, tmp_path, cfg, feature_net, CPU, seed=0)
    assert set(compute_metrics(val[:16], tmp_path, cfg, feature_net, CPU, seed=0)) == \
        {"precision_domain", "recall_domain", "f_score_domain"}


EVALUATE_PEAK_SCRIPT = r"""
import json, sys
import numpy as np, torch
from flexvar.config import EvaluateConfig
from flexvar.evaluation.intervals import sample_intervals
from flexvar.evaluation.metrics import compute_metrics

def peak_mb():
    return int(next(line for line in open("/proc/self/status") if line.startswith("VmHWM:")).split()[1]) / 1024

reference, feature_net, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
cfg = EvaluateConfig(kid_subset_size=20, bootstrap_samples=20)
gen = torch.Generator().manual_seed(0)
warm = torch.randint(0, 256, (256, 3, 8, 8), dtype=torch.uint8, generator=gen)
point = compute_metrics(warm, reference, cfg, feature_net, torch.device("cpu"), seed=0)   # imports, extractor
sample_intervals(warm, torch.arange(256) % 8, point, reference, cfg, feature_net, torch.device("cpu"), seed=0)
before = peak_mb()
images = torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=gen)
point = compute_metrics(images, reference, cfg, feature_net, torch.device("cpu"), seed=0)
out = sample_intervals(images, torch.arange(n) % 8, point, reference, cfg, feature_net, torch.device("cpu"), seed=0)
print(json.dumps({"peak_growth_mb": peak_mb() - before, "precision": point["precision_domain"], **out}))
"""


@pytest.mark.slow
def test_evaluate_peak_memory_at_many_samples_is_bounded(feature_net, reference):
    """compute_metrics + sample_intervals (what the evaluate stage runs) on 15,000 samples in a fresh process:
    precision/recall's pairwise distances are computed in blocks of a bounded number of distances: the peak
    grows by ~0.4 GB here. With torch-fidelity's default block (10,000 rows x all samples) it grew by 3.5 GB
    (and more at the paper's 50,000); the samples, their features and top classes are a few MB."""
    import subprocess
    import sys

    out, _ = reference
    r = subprocess.run([sys.executable, "-c", EVALUATE_PEAK_SCRIPT, str(out), str(feature_net), "15000"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert 0 <= result["precision"] <= 1 and "fid_domain_ci_low" in result
    assert result["peak_growth_mb"] < 1000, result
