"""The paper-comparable FID protocol, offline: Inception features from a local weights file, the
reference as the ADM evaluator's reference batch (.npz with mu/sigma) or an image folder, and the
protocol recorded with every FID (metrics JSON, MLflow, report table).

The Inception weights are torch-fidelity's inception-v3-compat architecture with random weights
saved to a local file (the real file is a download); the ADM-layout reference batch is made here
from torch-fidelity's own features of a folder of images, so the two reference forms must agree.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch_fidelity
import yaml
from PIL import Image

from flexvar.config import ConfigError, EvaluateConfig, load_params_dict
from flexvar.evaluation.intervals import sample_intervals
from flexvar.evaluation.metrics import MetricsError, compute_metrics, compute_reference

CPU = torch.device("cpu")
N, SIDE = 6, 32


@pytest.fixture(scope="module")
def local_files(tmp_path_factory):
    """(inception weights .pth, reference image folder, ADM-layout reference .npz, sample images)."""
    import torch_fidelity.feature_extractor_inceptionv3 as tfi

    d = tmp_path_factory.mktemp("fid_protocol")
    torch.save({}, d / "empty.pth")
    mp = pytest.MonkeyPatch()
    mp.setattr(tfi.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None)
    torch.manual_seed(0)
    net = tfi.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(d / "empty.pth"))
    mp.undo()
    with torch.no_grad():   # He init: PyTorch's default conv init shrinks the signal to identical features
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    torch.save(net.state_dict(), d / "inception.pth")
    gen = torch.Generator().manual_seed(1)
    ref = torch.randint(0, 256, (N, 3, SIDE, SIDE), dtype=torch.uint8, generator=gen)
    (d / "ref").mkdir()
    for i, img in enumerate(ref):
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(d / "ref" / f"{i}.png")
    net = tfi.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(d / "inception.pth"))
    with torch.no_grad():
        feats = net(ref)[0].double().numpy()
    np.savez(d / "VIRTUAL_ref_labeled.npz", arr_0=ref.permute(0, 2, 3, 1).numpy(), mu=feats.mean(0),
             sigma=np.cov(feats, rowvar=False), mu_s=feats.mean(0)[:16], sigma_s=np.eye(16))   # ADM layout
    samples = torch.randint(0, 256, (N, 3, SIDE, SIDE), dtype=torch.uint8, generator=gen)
    return d / "inception.pth", d / "ref", d / "VIRTUAL_ref_labeled.npz", samples


def _cfg(weights, reference, metrics=("fid",)) -> EvaluateConfig:
    return EvaluateConfig(feature_space="inception", inception_weights=str(weights), reference=reference,
                          metrics=list(metrics), kid_subset_size=2)


def test_adm_reference_batch_gives_the_fid_of_its_images(local_files, tmp_path):
    weights, folder, npz, samples = local_files
    adm = _cfg(weights, f"adm:{npz}", ["fid", "isc"])
    compute_reference(None, tmp_path / "adm", adm, None, CPU, seed=0)
    got = compute_metrics(samples, tmp_path / "adm", adm, None, CPU, seed=0)
    assert set(got) == {"fid_inception", "isc_inception", "isc_std_inception"}
    ref = torch_fidelity.calculate_metrics(   # torch-fidelity alone, on the images the batch was made from
        input1=_Images(samples), input2=str(folder), fid=True, feature_extractor="inception-v3-compat",
        feature_extractor_weights_path=str(weights), cuda=False, verbose=False, save_cpu_ram=True)
    assert ref["frechet_inception_distance"] > 0.01          # the random features do tell images apart
    assert got["fid_inception"] == pytest.approx(ref["frechet_inception_distance"], rel=1e-3)


def test_image_folder_reference(local_files, tmp_path):
    weights, folder, _, samples = local_files
    cfg = _cfg(weights, f"folder:{folder}", ["fid", "kid"])
    info = compute_reference(None, tmp_path / "folder", cfg, None, CPU, seed=0)
    assert info["num_images"] == N and info["source"] == f"folder:{folder}"
    got = compute_metrics(samples, tmp_path / "folder", cfg, None, CPU, seed=0)
    assert set(got) == {"fid_inception", "kid_inception", "kid_std_inception"} and got["fid_inception"] > 0


def test_missing_or_unusable_reference_names_the_param(local_files, tmp_path):
    weights, _, npz, samples = local_files
    cases = [(_cfg(weights, f"adm:{tmp_path}/VIRTUAL_imagenet256_labeled.npz"), r"evaluate\.reference .*does not exist"),
             (_cfg(weights, f"folder:{tmp_path}/nope"), r"evaluate\.reference .*not a folder"),
             (_cfg(weights, f"adm:{npz}", ["fid", "kid"]), r"evaluate\.metrics \['kid'\]"),
             (EvaluateConfig(reference=f"adm:{npz}"), r"evaluate\.feature_space: inception"),
             (_cfg(tmp_path / "no-weights.pth", f"adm:{npz}"), r"evaluate\.inception_weights")]
    for cfg, msg in cases:
        with pytest.raises(MetricsError, match=msg):
            compute_reference(None, tmp_path / "r", cfg, None, CPU, seed=0)
    with pytest.raises(ConfigError, match=r"evaluate\.reference"):
        load_params_dict({"evaluate": {"reference": "http://example.org/ref.npz"}})


def test_evaluate_stage_records_the_protocol(local_files, tmp_path, monkeypatch, capsys):
    from mlflow import MlflowClient

    from pipeline import evaluate, reference_stats, report

    weights, _, npz, samples = local_files
    monkeypatch.chdir(tmp_path)
    for key in ("MLFLOW_TRACKING_URI", "DVC_ROOT", "FLEXVAR_PARENT_RUN_ID"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("FLEXVAR_PIPELINE_RUN_ID", "fid-protocol")
    params = {"data": {"resolution": SIDE}, "tokenizer": {"ch_mult": [1, 2, 2, 4]},
              "schedule": {"canonical": [1, 2, 3, 4], "head": [1, 2], "groups": [[1, 3, 3]]},
              "sample": {"guidance": 2.5, "top_k": 900, "top_p": 0.95, "schedules": {"s4": {"scales": [1, 2, 3, 4]}}},
              "variants": {"depths": [2], "schedules": ["s4"]},
              "sweep": {"eval_panel": {"s4": {"scales": [1, 2, 3, 4]}}},
              "evaluate": {"feature_space": "inception", "inception_weights": str(weights),
                           "reference": f"adm:{npz}", "metrics": ["fid", "isc"]},
              "tracking": {"experiment": "protocol"}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    assert reference_stats.main([]) == 0
    (tmp_path / "samples/d2/s4").mkdir(parents=True)
    np.savez(tmp_path / "samples/d2/s4/samples.npz", samples.permute(0, 2, 3, 1).numpy(), labels=np.zeros(N, np.int64))
    (tmp_path / "samples/d2/s4/info.json").write_text(json.dumps(
        {"scales": [[s, s] for s in (1, 2, 3, 4)], "steps": 4, "sampling": {
            "guidance": 2.5, "guidance_schedule": "ramp", "top_k": 900, "top_p": 0.95, "greedy_rule": "official",
            "precision": "auto"}}))
    assert evaluate.main(["--depth", "2", "--schedule", "s4"]) == 0
    result = json.loads((tmp_path / "metrics/eval/d2/s4.json").read_text())
    skipped = [line for line in capsys.readouterr().out.splitlines() if "skipped" in line]
    assert len(skipped) == 1 and skipped[0].startswith(
        "evaluate d2/s4: class_acc_inception skipped: evaluate.inception_label_map is empty")
    assert not any(k.startswith("class_acc") for k in result)
    assert result["protocol"] == (f"adm:{npz} · inception · n={N} · guidance 2.5 ramp · top-k 900 · top-p 0.95 · "
                                  f"4 steps · greedy official")
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("protocol")
    (run,) = client.search_runs([exp.experiment_id], "tags.stage = 'evaluate'")
    assert run.data.tags["protocol"] == result["protocol"] and "fid_inception" in run.data.metrics
    assert {k: run.data.params[f"protocol.{k}"] for k in ("reference", "num_samples", "top_k", "greedy_rule", "scales")} \
        == {"reference": f"adm:{npz}", "num_samples": str(N), "top_k": "900", "greedy_rule": "official",
            "scales": "1x1 2x2 3x3 4x4"}
    assert report.main([]) == 0
    assert result["protocol"] in (tmp_path / "reports/fid_table.md").read_text()


def test_class_acc_inception_reads_logits_in_imagenet_order(local_files, tmp_path):
    """The real inception-v3-compat forward (random weights) through a 1000-synset label map written
    here: class k = synset n1000000k = node 1 + (7k mod 1000), so its logit is column 1 + (7k mod 1000)."""
    import torch_fidelity.feature_extractor_inceptionv3 as tfi

    weights, _, _, samples = local_files
    (tmp_path / "map.pbtxt").write_text("".join(
        f'entry {{\n  target_class: {1 + (7 * k) % 1000}\n  target_class_string: "n{10000000 + k:08d}"\n}}\n'
        for k in range(1000)))
    net = tfi.FeatureExtractorInceptionV3("inception-v3-compat", ["logits_unbiased"],
                                          feature_extractor_weights_path=str(weights))
    with torch.no_grad():
        logits_NC = net(samples)[0].double().numpy()
    by_class_N = logits_NC[:, [1 + (7 * k) % 1000 for k in range(1000)]].argmax(1)
    assert (by_class_N != logits_NC[:, :1000].argmax(1)).any()    # the map matters for these images
    labels_N = by_class_N.copy()
    labels_N[-1] = 999 if by_class_N[-1] != 999 else 998              # one wrong, and 1000 classes spanned
    cfg = EvaluateConfig(feature_space="inception", inception_weights=str(weights),
                         inception_label_map=str(tmp_path / "map.pbtxt"), bootstrap_samples=0)
    got = sample_intervals(samples, torch.from_numpy(labels_N), {}, tmp_path, cfg, None, CPU, seed=0)
    assert got == {"class_acc_inception": pytest.approx((N - 1) / N)}


class _Images(torch.utils.data.Dataset):
    def __init__(self, x):
        self.x = x

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i]
