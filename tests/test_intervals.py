"""flexvar.evaluation.intervals on tiny real data: class accuracy of samples and bootstrap intervals for FID
and class accuracy, with a feature net trained a few steps on the tiny prepared split (fixtures of test_metrics)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

from flexvar.data.splits import load_split
from flexvar.evaluation.feature_net import evaluate_feature_net, feature_net_metrics, load_feature_net
from flexvar.evaluation.intervals import (
    FrechetToReference, class_correct, fid_interval, mean_interval, reference_statistics, sample_features,
    sample_intervals,
)
from flexvar.evaluation.metrics import MetricsError, compute_metrics
from tests.test_metrics import CPU, _cfg, feature_net, reference  # noqa: F401  (fixtures)


@pytest.mark.parametrize("n", [20, 300])   # fewer rows than dimensions (Gram path) and more
def test_frechet_matches_torch_fidelity(n):
    rng = np.random.default_rng(0)
    ref_MD = rng.normal(size=(500, 64)) @ rng.normal(size=(64, 64)) * 0.3
    x_ND = rng.normal(loc=0.2, size=(n, 64)) @ rng.normal(size=(64, 64)) * 0.3
    ref, x = fid_features_to_statistics(torch.from_numpy(ref_MD)), fid_features_to_statistics(torch.from_numpy(x_ND))
    expected = fid_statistics_to_metric(x, ref, verbose=False)["frechet_inception_distance"]
    assert FrechetToReference(ref["mu"], ref["sigma"])(x_ND) == pytest.approx(expected, rel=1e-6)


def test_class_acc_of_real_val_images_equals_classifier_val_accuracy(tiny_prepared, feature_net):
    val = load_split(tiny_prepared, "val")
    feats = sample_features(val.images_NCHW, _cfg(), feature_net, CPU)
    acc = class_correct(feats["logits"], val.labels_N).mean()
    expected = evaluate_feature_net(load_feature_net(feature_net), val, CPU)["accuracy"]
    assert acc == pytest.approx(expected, abs=1e-9)
    assert acc == pytest.approx(feature_net_metrics(feature_net)["val_accuracy"], abs=1e-9)


def test_reference_statistics_come_from_the_cache(tiny_prepared, feature_net, reference):
    out, _ = reference
    mu_D, sigma_DD = reference_statistics(out, _cfg(), feature_net, CPU)
    val_feats = sample_features(load_split(tiny_prepared, "val").images_NCHW, _cfg(), feature_net, CPU)["features"]
    np.testing.assert_allclose(mu_D, val_feats.mean(0), atol=1e-6)
    # the reference scored against its own cached statistics: FID ~ 0
    assert abs(FrechetToReference(mu_D, sigma_DD)(val_feats)) < 1e-6


def test_reference_statistics_missing_cache_names_the_stage(feature_net, tmp_path):
    with pytest.raises(MetricsError, match="reference_stats"):
        reference_statistics(tmp_path, _cfg(), feature_net, CPU)


def test_fid_interval_contains_point_and_narrows_with_more_samples(tiny_prepared, feature_net, reference):
    out, _ = reference
    frechet = FrechetToReference(*reference_statistics(out, _cfg(), feature_net, CPU))
    train = sample_features(load_split(tiny_prepared, "train").images_NCHW, _cfg(), feature_net, CPU)["features"]
    widths = {}
    for n in (48, 256):
        point = frechet(train[:n])
        lo, hi = fid_interval(train[:n], frechet, point, num=300, seed=0)
        assert lo < point < hi
        widths[n] = hi - lo
    assert widths[256] < 0.75 * widths[48]          # ~1/sqrt(n): 0.43 expected


def test_class_acc_interval_matches_binomial_width():
    correct_N = (np.random.default_rng(1).random(400) < 0.7).astype(np.float64)
    p = correct_N.mean()
    lo, hi = mean_interval(correct_N, num=2000, seed=0)
    assert lo < p < hi
    assert hi - lo == pytest.approx(2 * 1.96 * np.sqrt(p * (1 - p) / 400), rel=0.15)


def test_class_correct_rejects_missing_labels():
    with pytest.raises(MetricsError, match="labels"):
        class_correct(np.zeros((3, 8)), np.full(3, -1))


def test_sample_intervals_keys_seeded_and_centred(tiny_prepared, feature_net, reference):
    out, _ = reference
    val = load_split(tiny_prepared, "val")
    cfg = _cfg(bootstrap_samples=200)
    point = compute_metrics(val.images_NCHW, out, cfg, feature_net, CPU, seed=0)
    m = sample_intervals(val.images_NCHW, val.labels_N, point, out, cfg, feature_net, CPU, seed=0)
    assert set(m) == {"class_acc_domain", "class_acc_domain_ci_low", "class_acc_domain_ci_high",
                      "fid_domain_ci_low", "fid_domain_ci_high"}
    assert m["fid_domain_ci_low"] < point["fid_domain"] < m["fid_domain_ci_high"]
    assert m["class_acc_domain_ci_low"] <= m["class_acc_domain"] <= m["class_acc_domain_ci_high"]
    assert m == sample_intervals(val.images_NCHW, val.labels_N, point, out, cfg, feature_net, CPU, seed=0)
    assert m != sample_intervals(val.images_NCHW, val.labels_N, point, out, cfg, feature_net, CPU, seed=1)
    none = sample_intervals(val.images_NCHW, val.labels_N, point, out, _cfg(bootstrap_samples=0), feature_net, CPU, 0)
    assert set(none) == {"class_acc_domain"} and none["class_acc_domain"] == m["class_acc_domain"]
