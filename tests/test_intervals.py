"""flexvar.evaluation.intervals on tiny real data: class accuracy of samples and bootstrap intervals for FID
and class accuracy, with a feature net trained a few steps on the tiny prepared split (fixtures of test_metrics)."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

from flexvar.data.splits import load_split
from flexvar.evaluation.feature_net import evaluate_feature_net, feature_net_metrics, load_feature_net
from flexvar.evaluation.intervals import (
    BootstrapFrechet, FrechetToReference, bootstrap_counts, class_acc_skipped, class_correct, fid_interval,
    imagenet_logits, mean_interval, read_inception_label_map, reference_statistics, sample_features,
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


def _fidelity_fid(x_ND: np.ndarray, ref: dict) -> float:
    x = fid_features_to_statistics(torch.from_numpy(np.ascontiguousarray(x_ND)))
    return fid_statistics_to_metric(x, ref, verbose=False)["frechet_inception_distance"]


@pytest.mark.parametrize("n", [20, 300])   # fewer drawn rows than dimensions (Gram path) and more
def test_bootstrap_replicate_is_the_fid_of_the_drawn_rows(n):
    """A replicate from draw counts = torch-fidelity's FID of the gathered rows (duplicates included)."""
    rng = np.random.default_rng(0)
    ref_MD = rng.normal(size=(500, 64)) @ rng.normal(size=(64, 64)) * 0.3
    x_ND = rng.normal(loc=0.2, size=(n, 64)) @ rng.normal(size=(64, 64)) * 0.3
    ref = fid_features_to_statistics(torch.from_numpy(ref_MD))
    replicate_before = FrechetToReference(ref["mu"], ref["sigma"])
    replicate = BootstrapFrechet(x_ND, replicate_before)
    draws = np.random.default_rng(7).integers(0, n, size=(3, n))       # the same stream, as index rows
    for counts_N, idx_N in zip(bootstrap_counts(n, 3, seed=7), draws):
        assert np.array_equal(counts_N, np.bincount(idx_N, minlength=n))
        got = replicate(counts_N)
        assert got == pytest.approx(_fidelity_fid(x_ND[idx_N], ref), rel=1e-6)     # scipy sqrtm's precision
        assert got == pytest.approx(replicate_before(x_ND[idx_N]), rel=1e-8)   # the gathered-rows replicate (sqrt of rounding-size eigenvalues)


@pytest.mark.parametrize("seed", range(5))
def test_intervals_stay_inside_the_metric_range_at_small_n(seed):
    """A share near 0 or 1 and an FID near 0 at n = 20: the bias shift must not push an end outside
    [0, 1] / below 0 (the smoke run's class_acc_domain_ci_low was -0.00125)."""
    for k in (1, 19):                                                  # 1 of 20 correct, 19 of 20 correct
        correct_N = np.zeros(20)
        correct_N[:k] = 1.0
        lo, hi = mean_interval(correct_N, num=200, seed=seed)
        assert 0.0 <= lo <= k / 20 <= hi <= 1.0, (k, lo, hi)
    x_ND = np.random.default_rng(seed).normal(size=(20, 8))
    ref = fid_features_to_statistics(torch.from_numpy(x_ND))           # the samples' own statistics: FID ~ 0
    frechet = FrechetToReference(ref["mu"], ref["sigma"])
    point = frechet(x_ND)
    lo, hi = fid_interval(x_ND, frechet, point, num=200, seed=seed)
    assert abs(point) < 1e-9 and 0.0 <= lo <= hi and hi > 0.0, (point, lo, hi)


def test_class_acc_of_real_val_images_equals_classifier_val_accuracy(tiny_prepared, feature_net):
    val = load_split(tiny_prepared, "val")
    feats = sample_features(val.images_NCHW, _cfg(), feature_net, CPU)
    acc = class_correct(feats["top_class"], val.labels_N, feats["num_classes"]).mean()
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
        class_correct(np.zeros(3, dtype=np.int64), np.full(3, -1), num_classes=8)


def test_sample_intervals_keys_seeded_and_centred(tiny_prepared, feature_net, reference):
    out, _ = reference
    train = load_split(tiny_prepared, "train")   # not the reference split itself: its FID is 0 up to rounding
    cfg = _cfg(bootstrap_samples=200)
    point = compute_metrics(train.images_NCHW, out, cfg, feature_net, CPU, seed=0)
    m = sample_intervals(train.images_NCHW, train.labels_N, point, out, cfg, feature_net, CPU, seed=0)
    assert set(m) == {"class_acc_domain", "class_acc_domain_ci_low", "class_acc_domain_ci_high",
                      "fid_domain_ci_low", "fid_domain_ci_high"}
    assert m["fid_domain_ci_low"] < point["fid_domain"] < m["fid_domain_ci_high"]
    assert m["class_acc_domain_ci_low"] <= m["class_acc_domain"] <= m["class_acc_domain_ci_high"]
    assert m == sample_intervals(train.images_NCHW, train.labels_N, point, out, cfg, feature_net, CPU, seed=0)
    assert m != sample_intervals(train.images_NCHW, train.labels_N, point, out, cfg, feature_net, CPU, seed=1)
    none = sample_intervals(train.images_NCHW, train.labels_N, point, out, _cfg(bootstrap_samples=0), feature_net, CPU, 0)
    assert set(none) == {"class_acc_domain"} and none["class_acc_domain"] == m["class_acc_domain"]


# --------------------------------------------------------------------------- inception class order
def _label_map(path, entries, header=True) -> str:
    """A label map in the TF graph's .pbtxt layout (imagenet_2012_challenge_label_map_proto.pbtxt)."""
    text = "# -*- protobuffer -*-\n# LabelMap from ImageNet 2012 full data set UID to int32 target class.\n" \
        if header else ""
    text += "".join(f'entry {{\n  target_class: {node}\n  target_class_string: "{synset}"\n}}\n'
                    for node, synset in entries)
    path.write_text(text)
    return str(path)


def _imagenet_map(path) -> str:
    """1000 synsets n10000000 + k (class k), listed backwards, at node id 1 + (7k mod 1000)."""
    return _label_map(path, [(1 + (7 * k) % 1000, f"n{10000000 + k:08d}") for k in reversed(range(1000))])


def test_inception_label_map_orders_columns_by_sorted_synset(tmp_path):
    # synsets in file order b, a, c at nodes 5, 2, 7 -> sorted a, b, c: class 0 = node 2, 1 = node 5, 2 = node 7
    path = _label_map(tmp_path / "map.pbtxt", [(5, "n02000000"), (2, "n01000000"), (7, "n03000000")])
    columns_K = read_inception_label_map(path, num_classes=3)
    assert columns_K.tolist() == [2, 5, 7]
    logits_NC = np.zeros((2, 1008))
    logits_NC[0, 5], logits_NC[0, 0], logits_NC[0, 1] = 3.0, 9.0, 8.0   # background / unmapped nodes are ignored
    logits_NC[1, 7], logits_NC[1, 2] = 1.0, 0.5
    logits_NK = imagenet_logits(logits_NC, columns_K)
    assert logits_NK.tolist() == [[0.0, 3.0, 0.0], [0.5, 0.0, 1.0]]
    assert class_correct(logits_NK.argmax(1), np.array([1, 2]), num_classes=3).tolist() == [1.0, 1.0]
    assert imagenet_logits(torch.from_numpy(logits_NC), columns_K).tolist() == logits_NK.tolist()   # batches
    assert read_inception_label_map(_imagenet_map(tmp_path / "imagenet.pbtxt")).tolist() == \
        [1 + (7 * k) % 1000 for k in range(1000)]


@pytest.mark.parametrize("entries, text", [
    ([(5, "n02000000"), (2, "n01000000")], None),                          # 2 synsets, 3 expected
    ([(5, "n02000000"), (2, "n02000000"), (7, "n03000000")], None),       # a synset twice
    ([(5, "n02000000"), (5, "n01000000"), (7, "n03000000")], None),       # a node id twice
    ([(0, "n02000000"), (2, "n01000000"), (7, "n03000000")], None),       # node 0 is the background
    ([(1008, "n02000000"), (2, "n01000000"), (7, "n03000000")], None),    # past the 1008 logits
    ([(5, "n02000000"), (2, "n01000000"), (7, "n03000000")], 'entry {\n  target_class: 9\n}\n'),  # no synset
])
def test_malformed_inception_label_map_names_the_key(tmp_path, entries, text):
    path = _label_map(tmp_path / "map.pbtxt", entries)
    if text:
        with open(path, "a") as f:
            f.write(text)
    with pytest.raises(MetricsError, match=r"evaluate\.inception_label_map .*3 distinct synsets"):
        read_inception_label_map(path, num_classes=3)
    with pytest.raises(MetricsError, match=r"evaluate\.inception_label_map .*cannot be read"):
        read_inception_label_map(tmp_path / "missing.pbtxt")


def test_class_acc_skipped_says_which_metric_and_why(tmp_path):
    imagenet_N = np.array([0, 999, 3])
    assert class_acc_skipped(_cfg(), imagenet_N) == ""
    inception = _cfg(feature_space="inception")
    assert re.fullmatch(r"class_acc_inception skipped: evaluate\.inception_label_map is empty \(.*\)",
                        class_acc_skipped(inception, imagenet_N))
    mapped = _cfg(feature_space="inception", inception_label_map=_imagenet_map(tmp_path / "map.pbtxt"))
    assert class_acc_skipped(mapped, imagenet_N) == ""
    assert class_acc_skipped(mapped, np.arange(8)) == \
        "class_acc_inception skipped: the samples' labels span 8 classes, not ImageNet's 1000"
    bad = _cfg(feature_space="inception", inception_label_map=_label_map(tmp_path / "bad.pbtxt", [(5, "n02000000")]))
    with pytest.raises(MetricsError, match=r"evaluate\.inception_label_map"):
        class_acc_skipped(bad, imagenet_N)
