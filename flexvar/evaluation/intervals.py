"""Class accuracy of samples and 95% bootstrap intervals for FID and class accuracy.

Why: with a few hundred samples per variant, FID differences between variants can be noise. The
interval says how far the figure moves when the generated set is resampled (the reference side is
fixed: its statistics come from the `reference_stats` cache).

How: the samples' features (and classifier logits) are extracted once; each bootstrap replicate
draws N rows with replacement from that (N, D) matrix and recomputes the Fréchet distance to the
cached reference statistics, or the share of correctly classified rows. Resampling with
replacement duplicates rows and so inflates FID; the interval is therefore the replicates'
2.5-97.5 percentile range shifted by the bootstrap's estimate of that bias (replicate mean minus
point estimate), which leaves an unbiased statistic's (class accuracy) percentile interval as is
up to Monte Carlo noise, and then clipped to the metric's range (FID >= 0, a share in [0, 1]):
near the range's edge the shift alone would leave it (a share of 0.5% gave a low end of -0.00125).

Cost (`BootstrapFrechet`): a replicate is the draw counts w (N,) of the rows, never a gathered copy.
The centred features are projected once onto S = sqrt(Σ_ref) (Z = (X - μ) S), so a replicate's
tr sqrt(S Σ_b S) is the eigenvalue sum of the w-weighted covariance of Z's k ≈ 0.63 N drawn rows:
one (k x D) Gram product and one min(k, D)-sized eigendecomposition, instead of a gather, an
(N x D)(D x D) projection and an N-row Gram per replicate, in float64 on the evaluation's device (CUDA
when the stage has it). Replicates equal the gathered-rows Fréchet distance to float64 rounding (tested
against torch-fidelity); `python -m benchmarks.bench_fid_interval` measures both side by side.

Class accuracy (`class_acc_<space>`) is the share of generated images that the feature space's
classifier assigns to the class they were generated for. The `domain` space's classifier is the
pipeline's feature net (its `logits`). The `inception` space's is torch-fidelity's inception-v3-compat
(`logits_unbiased`, 1008 columns): the columns are the node ids of the 2015 TF graph (0 = background,
1..1000 = ImageNet synsets, 1001..1007 unused), not ImageNet-1k class order, so `class_acc_inception`
needs the graph's label map (`evaluate.inception_label_map`: node id -> synset); ImageNet class k is the
k-th synset in sorted order. Without the map, or when the samples' classes are not ImageNet's 1000,
the metric is skipped and `class_acc_skipped` says why.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import torch
from torch_fidelity.utils import create_feature_extractor, extract_featuresdict_from_input_id_cached

from flexvar.config import EvaluateConfig
from flexvar.evaluation.metrics import (
    MetricsError, UInt8Images, _CachedOnly, feature_weights, load_adm_reference, reference_name, reference_source,
)

LEVEL = 0.95
FID_LAYER = {"domain": "features", "inception": "2048"}      # torch-fidelity's default FID layer per space
CLASS_LOGITS = {"domain": "logits", "inception": "logits_unbiased"}   # the class logits per space
INCEPTION_LOGITS_WIDTH = 1008                                 # TF 2015 graph: node ids 0..1007
IMAGENET_CLASSES = 1000
_LABEL_MAP_ENTRY = re.compile(r'entry\s*\{\s*target_class:\s*(\d+)\s*target_class_string:\s*"(n\d{8})"\s*\}')


# --------------------------------------------------------------------------- statistics
def mean_cov(features_ND: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) in float64, as torch-fidelity computes FID statistics."""
    x_ND = np.asarray(features_ND, dtype=np.float64)
    return x_ND.mean(0), np.cov(x_ND, rowvar=False)


def _psd_sqrt(sigma_DD: np.ndarray) -> np.ndarray:
    """Symmetric square root of a PSD matrix (negative eigenvalues from rounding clipped to 0)."""
    w_D, v_DD = np.linalg.eigh(sigma_DD)
    return (v_DD * np.sqrt(np.clip(w_D, 0, None))) @ v_DD.T


class FrechetToReference:
    """Fréchet distance of feature rows to fixed reference statistics; sqrt(Σ_ref) computed once.

    tr sqrt(Σ Σ_ref) = sum of sqrt of the eigenvalues of S Σ S with S = sqrt(Σ_ref). With Σ = Yᵀ Y
    (Y = centred rows / sqrt(N-1)), S Σ S = (Y S)ᵀ (Y S) has the same non-zero eigenvalues as
    (Y S)(Y S)ᵀ, so each replicate costs an eigendecomposition of min(N, D) rows, not D: cheap for
    Inception's 2048-d features with a few hundred samples.
    """

    def __init__(self, ref_mu_D: np.ndarray, ref_sigma_DD: np.ndarray):
        self.mu_D, self.sigma_DD = np.asarray(ref_mu_D, np.float64), np.asarray(ref_sigma_DD, np.float64)
        self.sqrt_DD = _psd_sqrt(self.sigma_DD)
        self.trace = float(np.trace(self.sigma_DD))

    def __call__(self, features_ND: np.ndarray) -> float:
        x_ND = np.asarray(features_ND, dtype=np.float64)
        n = len(x_ND)
        if n < 2:
            raise MetricsError(f"FID needs at least 2 samples, got {n}")
        mu_D = x_ND.mean(0)
        y_ND = (x_ND - mu_D) / np.sqrt(n - 1) @ self.sqrt_DD
        gram = y_ND @ y_ND.T if n < y_ND.shape[1] else y_ND.T @ y_ND
        tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh(gram), 0, None)).sum()
        trace_x = float(((x_ND - mu_D) ** 2).sum() / (n - 1))
        diff_D = mu_D - self.mu_D
        return float(diff_D @ diff_D + trace_x + self.trace - 2 * tr_covmean)


def class_correct(top_class_N: torch.Tensor | np.ndarray, labels_N: torch.Tensor | np.ndarray,
                  num_classes: int) -> np.ndarray:
    """1.0 where the classifier's top class is the label the image was generated for, else 0.0 (N,)."""
    top_class_N, labels_N = np.asarray(top_class_N), np.asarray(labels_N)
    if labels_N.ndim != 1 or len(labels_N) != len(top_class_N):
        raise MetricsError(f"need one class label per image: {len(labels_N)} labels for {len(top_class_N)} images")
    if (labels_N < 0).any() or (labels_N >= num_classes).any():
        raise MetricsError(f"class labels must lie in [0, {num_classes}) (the classifier's classes); "
                           f"got {labels_N.min()}..{labels_N.max()} — were the samples written without labels?")
    return (top_class_N == labels_N).astype(np.float64)


def read_inception_label_map(path: str | os.PathLike, num_classes: int = IMAGENET_CLASSES) -> np.ndarray:
    """Inception logit column of each ImageNet class index, (num_classes,) int64, from the TF graph's
    imagenet_2012_challenge_label_map_proto.pbtxt (`entry { target_class: <node id> target_class_string:
    "<synset>" }`): class k is the k-th synset in sorted order, its column that synset's node id."""
    key = f"evaluate.inception_label_map '{path}'"
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise MetricsError(f"{key} cannot be read ({type(e).__name__}: {e})") from None
    entries = [(synset, int(node)) for node, synset in _LABEL_MAP_ENTRY.findall(text)]
    blocks = len(re.findall(r"\bentry\s*\{", text))
    synsets, nodes = {s for s, _ in entries}, {n for _, n in entries}
    if not blocks == len(entries) == len(synsets) == len(nodes) == num_classes or \
            not all(0 < n < INCEPTION_LOGITS_WIDTH for n in nodes):
        raise MetricsError(f"{key} is not a label map of {num_classes} distinct synsets to distinct node ids in "
                           f"1..{INCEPTION_LOGITS_WIDTH - 1} ({len(entries)} well-formed entries of {blocks}, "
                           f"{len(synsets)} synsets); use the .pbtxt shipped in inception-2015-12-05.tgz")
    return np.array([node for _, node in sorted(entries)], dtype=np.int64)


def imagenet_logits(logits_NC: torch.Tensor | np.ndarray, columns_K: np.ndarray) -> torch.Tensor | np.ndarray:
    """Inception's node-id-ordered logits (N, 1008) -> ImageNet class order (N, K): column k = node columns_K[k]."""
    return logits_NC[:, columns_K]


def class_logit_columns(cfg: EvaluateConfig, labels_N: torch.Tensor | np.ndarray) -> tuple[np.ndarray | None, str]:
    """(logit columns in class order, why class_acc_<space> is skipped): (None, '') = the space's logits are
    already in class order; (None, reason) = skipped. Reads (so checks) the inception label map when it
    is used, so a bad file stops the stage before any feature extraction."""
    if cfg.feature_space != "inception":
        return None, ""
    if not cfg.inception_label_map:
        return None, ("class_acc_inception skipped: evaluate.inception_label_map is empty (the label map .pbtxt "
                      "from inception-2015-12-05.tgz maps Inception's 1008 logits to ImageNet classes)")
    num_classes = int(np.asarray(labels_N).max()) + 1 if len(labels_N) else 0
    if num_classes != IMAGENET_CLASSES:
        return None, (f"class_acc_inception skipped: the samples' labels span {num_classes} classes, "
                      f"not ImageNet's {IMAGENET_CLASSES}")
    return read_inception_label_map(cfg.inception_label_map), ""


def class_acc_skipped(cfg: EvaluateConfig, labels_N: torch.Tensor | np.ndarray) -> str:
    """Why class_acc_<space> is not computed for these samples ('' = it is); see class_logit_columns."""
    return class_logit_columns(cfg, labels_N)[1]


def interval(point: float, replicates: np.ndarray, level: float = LEVEL,
             low: float = -np.inf, high: float = np.inf) -> tuple[float, float]:
    """Bias-shifted percentile interval, [q_lo, q_hi] - (mean(replicates) - point), clipped to the
    metric's range [low, high]."""
    alpha = (1 - level) / 2
    lo, hi = np.quantile(replicates, [alpha, 1 - alpha])
    bias = float(np.mean(replicates)) - point
    return float(np.clip(lo - bias, low, high)), float(np.clip(hi - bias, low, high))


def bootstrap_counts(n: int, num: int, seed: int):
    """`num` replicates, each N draws with replacement from range(n) from a seeded generator, one at a time
    as draw counts per item (N,): memory O(N), not a (num, N) index array."""
    rng = np.random.default_rng(seed)
    for _ in range(num):
        yield np.bincount(rng.integers(0, n, size=n), minlength=n)


class BootstrapFrechet:
    """Fréchet distances to `frechet`'s reference of bootstrap replicates of the rows of `features_ND`,
    each given by its draw counts (see the module docstring); float64 on `device`."""

    def __init__(self, features_ND: np.ndarray, frechet: FrechetToReference, device: torch.device | None = None):
        on_cuda = device is not None and device.type == "cuda"            # float64: CUDA or the CPU (not MPS)
        f64 = dict(dtype=torch.float64, device=device if on_cuda else torch.device("cpu"))
        x_ND = torch.as_tensor(np.asarray(features_ND), **f64)
        self.n = len(x_ND)
        if self.n < 2:
            raise MetricsError(f"FID needs at least 2 samples, got {self.n}")
        mu_D = x_ND.mean(0)
        self.xc_ND = x_ND - mu_D
        del x_ND
        self.z_ND = self.xc_ND @ torch.as_tensor(frechet.sqrt_DD, **f64)          # centred rows, projected once
        self.sq_N = (self.xc_ND ** 2).sum(1)
        self.mu_diff_D = mu_D - torch.as_tensor(frechet.mu_D, **f64)
        self.ref_trace, self.f64 = frechet.trace, f64

    def __call__(self, counts_N: np.ndarray) -> float:
        n = self.n
        w_N = torch.as_tensor(counts_N, **self.f64)
        mx_D = w_N @ self.xc_ND / n                                   # replicate mean - sample mean
        trace_x = (w_N @ self.sq_N - n * mx_D @ mx_D) / (n - 1)
        diff_D = self.mu_diff_D + mx_D
        drawn_K = torch.nonzero(w_N).squeeze(1)
        w_K, a_KD = w_N[drawn_K], self.z_ND[drawn_K]
        a_KD.sub_(w_K @ a_KD / n).mul_((w_K / (n - 1)).sqrt()[:, None])   # weighted, centred: S Σ_b S = aᵀ a
        small = len(drawn_K) < a_KD.shape[1]
        if a_KD.device.type == "cpu":   # numpy's aᵀ a is one symmetric rank-k update (syrk): half a GEMM
            a = a_KD.numpy()
            tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh(a @ a.T if small else a.T @ a), 0, None)).sum()
        else:
            tr_covmean = float(torch.linalg.eigvalsh(a_KD @ a_KD.T if small else a_KD.T @ a_KD).clamp(min=0).sqrt().sum())
        return float(diff_D @ diff_D + trace_x) + self.ref_trace - 2 * float(tr_covmean)


def fid_interval(features_ND: np.ndarray, frechet: FrechetToReference, point: float, num: int, seed: int,
                 level: float = LEVEL, device: torch.device | None = None) -> tuple[float, float]:
    replicate = BootstrapFrechet(features_ND, frechet, device)
    reps = np.array([replicate(counts_N) for counts_N in bootstrap_counts(len(features_ND), num, seed)])
    return interval(point, reps, level, low=0.0)


def mean_interval(values_N: np.ndarray, num: int, seed: int, level: float = LEVEL) -> tuple[float, float]:
    """Interval of the mean of `values_N`, a share of items: inside [0, 1]."""
    values_N = np.asarray(values_N, dtype=np.float64)
    reps = np.array([counts_N @ values_N / len(values_N) for counts_N in bootstrap_counts(len(values_N), num, seed)])
    return interval(float(values_N.mean()), reps, level, low=0.0, high=1.0)


# --------------------------------------------------------------------------- features
def _extractor(cfg: EvaluateConfig, feature_net_path, layers: list[str], device: torch.device):
    name, weights = feature_weights(cfg, feature_net_path)
    cuda = device.type == "cuda" and torch.cuda.is_available()
    return create_feature_extractor(name, layers, cuda=cuda, feature_extractor_weights_path=str(weights),
                                    verbose=False), weights, cuda


def sample_features(samples_NCHW: torch.Tensor, cfg: EvaluateConfig, feature_net_path, device: torch.device,
                    columns_K: np.ndarray | None = None, batch_size: int = 64) -> dict[str, np.ndarray | int]:
    """The samples' FID-layer features (N, D) float64, extracted once, and the classifier's top class (N,)
    over its logits (in class order: `columns_K` picks and orders the columns, see class_logit_columns)
    and the number of classes; the logits themselves are dropped batch by batch (N x 1000 float64 is
    400 MB at 50,000 samples)."""
    layers = [FID_LAYER[cfg.feature_space], CLASS_LOGITS[cfg.feature_space]]
    extractor, _, cuda = _extractor(cfg, feature_net_path, layers, device)
    images = UInt8Images(samples_NCHW)
    features_N = torch.empty(0, dtype=torch.float64)
    top_class, num_classes = [], 0
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            batch = images.images_NCHW[i:i + batch_size]
            features_BD, logits_BC = extractor(batch.cuda() if cuda else batch)
            if i == 0:
                features_N = torch.empty(len(images), features_BD.shape[1], dtype=torch.float64)
            features_N[i:i + len(batch)] = features_BD.double().cpu()
            logits_BK = logits_BC if columns_K is None else imagenet_logits(logits_BC, columns_K)
            top_class.append(logits_BK.argmax(1).cpu())
            num_classes = logits_BK.shape[1]
    return {"features": features_N.numpy(), "top_class": torch.cat(top_class).numpy(), "num_classes": num_classes}


def reference_statistics(reference_dir: str | os.PathLike, cfg: EvaluateConfig, feature_net_path,
                         device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of the reference: an ADM reference batch's mu/sigma (evaluate.reference: adm:...)
    or the cached reference features (reference_stats stage); never recomputed here."""
    kind, path = reference_source(cfg)
    if kind == "adm":
        adm = load_adm_reference(path)
        return adm["mu"], adm["sigma"]
    layer = FID_LAYER[cfg.feature_space]
    extractor, weights, cuda = _extractor(cfg, feature_net_path, [layer], device)
    name = reference_name(cfg, weights)
    reference_dir = Path(reference_dir)
    feats = extract_featuresdict_from_input_id_cached(
        2, extractor, input2=_CachedOnly(0, reference_dir), input2_cache_name=name, cache=True,
        cache_root=str(reference_dir), cuda=cuda, batch_size=64, save_cpu_ram=True, verbose=False)
    return mean_cov(feats[layer].double().numpy())


# --------------------------------------------------------------------------- the evaluate-stage entry
def sample_intervals(samples_NCHW: torch.Tensor, labels_N: torch.Tensor, point: dict[str, float],
                     reference_dir: str | os.PathLike, cfg: EvaluateConfig, feature_net_path,
                     device: torch.device, seed: int) -> dict[str, float]:
    """class_acc_<space> and <metric>_ci_low / _ci_high for FID and class accuracy, by bootstrap over samples
    (class accuracy only where `class_acc_skipped` is empty).

    `point` holds the point estimates computed by torch-fidelity (compute_metrics); the FID interval is
    centred on its fid_<space>.
    """
    space, num = cfg.feature_space, cfg.bootstrap_samples
    columns_K, skipped = class_logit_columns(cfg, labels_N)
    feats = sample_features(samples_NCHW, cfg, feature_net_path, device, columns_K)
    out: dict[str, float] = {}
    if not skipped:
        correct_N = class_correct(feats["top_class"], labels_N, feats["num_classes"])
        out[f"class_acc_{space}"] = float(correct_N.mean())
        if num:
            out[f"class_acc_{space}_ci_low"], out[f"class_acc_{space}_ci_high"] = mean_interval(correct_N, num, seed)
    key = f"fid_{space}"
    if num and key in point:
        frechet = FrechetToReference(*reference_statistics(reference_dir, cfg, feature_net_path, device))
        out[f"{key}_ci_low"], out[f"{key}_ci_high"] = fid_interval(feats["features"], frechet, point[key],
                                                                   num, seed, device=device)
    return out
