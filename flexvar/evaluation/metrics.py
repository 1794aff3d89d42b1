"""Sample quality with torch-fidelity: FID, IS, KID, precision/recall in a named feature space.

Two feature spaces, and every metric key names the one it was computed in (`fid_domain`,
`fid_inception`, ...; never plain `fid`):

- `inception`: torch-fidelity's `inception-v3-compat`, the paper's protocol. Its weights are
  loaded only from `evaluate.inception_weights` (a local file); nothing is downloaded. Its class
  accuracy (`class_acc_inception`, flexvar/evaluation/intervals.py) also needs the graph's label map
  (`evaluate.inception_label_map`, a local file) to put its 1008 logits in ImageNet class order.
- `domain`: the pipeline's own classifier (flexvar/evaluation/feature_net.py), registered with
  torch-fidelity as the feature extractor `flexvar-domain`; needs no download.

The reference is the prepared split (`evaluate.reference_split`), an image folder
(`evaluate.reference: folder:<dir>`) or the ADM evaluator's reference batch
(`evaluate.reference: adm:<file.npz>`, e.g. VIRTUAL_imagenet256_labeled.npz: the mu/sigma of
Inception pool features the paper's FIDs are measured against; FID from those statistics, IS from
the samples alone). Every FID is recorded with its protocol (`fid_protocol`).

Reference features are computed once (`compute_reference`, the `reference_stats` stage) into
torch-fidelity's file cache under a name that includes a hash of the feature weights and the
split, so a changed feature net can never be scored against stale statistics; `compute_metrics`
only reads that cache for the reference side.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch_fidelity
from torch.utils.data import Dataset
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.utils import (create_feature_extractor, extract_featuresdict_from_input_id_cached,
                                  resolve_feature_layer_for_metric)

from flexvar.checkpoint import file_sha256
from flexvar.config import EvaluateConfig, SamplingSettings
from flexvar.evaluation.feature_net import load_feature_net
from flexvar.errors import FlexvarError

DOMAIN_EXTRACTOR = "flexvar-domain"
INCEPTION_EXTRACTOR = "inception-v3-compat"
INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_WEIGHTS_FILE}"
REFERENCE_INFO = "reference.json"
# precision/recall compare every sample with every other (k-NN radii): torch-fidelity computes the pairwise
# distances in blocks of `prc_batch_size` rows x all N columns, and holds about three such blocks at once.
# Its default, 10,000 rows, is 2 GB per block at the paper's 50,000 samples; rows are chosen here so that a
# block holds at most this many distances (64 MB of float32), whatever N.
PRC_BLOCK_DISTANCES = 2 ** 24

# torch-fidelity's result keys -> our names (the feature space is appended: fid_domain, ...)
_RENAME = {
    "frechet_inception_distance": "fid",
    "inception_score_mean": "isc",
    "inception_score_std": "isc_std",
    "kernel_inception_distance_mean": "kid",
    "kernel_inception_distance_std": "kid_std",
    "precision": "precision",
    "recall": "recall",
    "f_score": "f_score",
}


class MetricsError(FlexvarError, RuntimeError):
    """Metrics cannot be computed as configured (missing weights, missing reference cache, too few images)."""


# --------------------------------------------------------------------------- domain extractor
class DomainFeatureExtractor(FeatureExtractorBase):
    """torch-fidelity adapter for FeatureNet: uint8 (B, 3, H, W) -> ('features' (B, D), 'logits' (B, K))."""

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        if not feature_extractor_weights_path:
            raise MetricsError("the domain feature extractor needs the trained feature net checkpoint "
                               "(run the train_feature_net stage)")
        self.net = load_feature_net(feature_extractor_weights_path)

    @staticmethod
    def get_provided_features_list():
        return "features", "logits"

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"isc": "logits", "fid": "features", "kid": "features", "prc": "features"}[metric]

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, 64, 64, dtype=torch.uint8)

    def forward(self, images_BCHW: torch.Tensor):
        features_BD, logits_BK = self.net(self.net.to_input(images_BCHW))
        out = {"features": features_BD.double(), "logits": logits_BK.double()}
        return tuple(out[name] for name in self.features_list)


if DOMAIN_EXTRACTOR not in torch_fidelity.registry.FEATURE_EXTRACTORS_REGISTRY:
    torch_fidelity.register_feature_extractor(DOMAIN_EXTRACTOR, DomainFeatureExtractor)


# --------------------------------------------------------------------------- inputs
class UInt8Images(Dataset):
    """uint8 (N, 3, H, W) tensor as the Dataset torch-fidelity reads (one CHW image per item)."""

    def __init__(self, images_NCHW: torch.Tensor):
        if isinstance(images_NCHW, Dataset):     # already a Dataset of uint8 CHW images (streamed from disk)
            self.images_NCHW = images_NCHW
            return
        if images_NCHW.dtype != torch.uint8 or images_NCHW.dim() != 4 or images_NCHW.shape[1] != 3:
            raise MetricsError(f"expected uint8 images of shape (N, 3, H, W), got {images_NCHW.dtype} "
                               f"{tuple(images_NCHW.shape)}")
        self.images_NCHW = images_NCHW

    def __len__(self) -> int:
        return len(self.images_NCHW)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images_NCHW[i].contiguous()


class _CachedOnly(Dataset):
    """Stands in for the reference images when their features must come from the cache."""

    def __init__(self, n: int, where: Path):
        self.n, self.where = n, where

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        raise MetricsError(f"reference features are missing from {self.where}; run the reference_stats stage "
                           f"(dvc repro reference_stats) with the same evaluate settings")


def load_samples(path: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor]:
    """samples.npz (OpenAI ADM evaluator layout: arr_0 uint8 (N, H, W, 3), labels (N,)) -> NCHW uint8, labels.

    The images are a view of the file, memory-mapped (copy-on-write) when arr_0 is stored
    uncompressed (np.savez and the sample stage): torch-fidelity then reads batch by batch from
    disk and 50,000 samples never sit in RAM at once."""
    from flexvar.data.arrays import npz_member_memmap

    try:
        with np.load(path) as npz:
            files = npz.files
            labels_N = npz["labels"] if "labels" in files else None
        images_NHWC = npz_member_memmap(path, "arr_0", mode="c") if "arr_0" in files else None
    except (OSError, ValueError, KeyError, EOFError, AttributeError) as e:
        raise MetricsError(f"{path}: not a samples.npz with an arr_0 array ({type(e).__name__}: {e})") from None
    if images_NHWC is None:
        raise MetricsError(f"{path}: no arr_0 (expected the ADM layout: arr_0 uint8 (N, H, W, 3))")
    if images_NHWC.dtype != np.uint8 or images_NHWC.ndim != 4 or images_NHWC.shape[-1] != 3:
        raise MetricsError(f"{path}: arr_0 must be uint8 (N, H, W, 3), got {images_NHWC.dtype} {images_NHWC.shape}")
    labels_N = np.full(len(images_NHWC), -1) if labels_N is None else labels_N
    images_NCHW = torch.from_numpy(images_NHWC).permute(0, 3, 1, 2)   # a view: nothing copied
    return images_NCHW, torch.from_numpy(labels_N.astype(np.int64))


# --------------------------------------------------------------------------- feature spaces
def feature_weights(cfg: EvaluateConfig, feature_net_path: str | os.PathLike | None) -> tuple[str, Path]:
    """(torch-fidelity extractor name, local weights file) for `cfg.feature_space`; never downloads."""
    if cfg.feature_space == "inception":
        path = Path(cfg.inception_weights) if cfg.inception_weights else None
        if path is None or not path.is_file():
            where = f"'{cfg.inception_weights}' does not exist" if cfg.inception_weights else "is empty"
            raise MetricsError(
                f"evaluate.feature_space is 'inception' but evaluate.inception_weights {where}. Set "
                f"evaluate.inception_weights in params.yaml to a local copy of torch-fidelity's "
                f"{INCEPTION_WEIGHTS_FILE} (download it once from {INCEPTION_WEIGHTS_URL}), or use "
                f"evaluate.feature_space: domain, which needs no download.")
        return INCEPTION_EXTRACTOR, path
    if feature_net_path is None or not Path(feature_net_path).is_file():
        raise MetricsError(f"evaluate.feature_space is 'domain' but the feature net checkpoint {feature_net_path} "
                           f"does not exist; run the train_feature_net stage (dvc repro train_feature_net)")
    return DOMAIN_EXTRACTOR, Path(feature_net_path)


def reference_name(cfg: EvaluateConfig, weights: Path) -> str:
    """torch-fidelity cache name of the reference: its source + feature-weights hash."""
    kind, path = reference_source(cfg)
    source = cfg.reference_split if kind == "split" else \
        f"{kind}-{file_sha256(path)[:12] if path.is_file() else _text_sha(str(path))}"
    return f"reference-{source}-{cfg.feature_space}-{file_sha256(weights)[:12]}"


def _text_sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


# --------------------------------------------------------------------------- reference sources
ADM_ONLY_METRICS = {"fid", "isc"}       # an ADM reference batch holds mu/sigma: no features for KID / P&R
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


def reference_source(cfg: EvaluateConfig) -> tuple[str, Path | None]:
    """('split', None), ('adm', reference batch .npz) or ('folder', image dir) from `evaluate.reference`;
    a missing file or an impossible combination stops here, naming the param."""
    if not cfg.reference:
        return "split", None
    kind, _, rest = cfg.reference.partition(":")
    path = Path(rest)
    if kind == "adm":
        if not path.is_file():
            raise MetricsError(f"evaluate.reference '{cfg.reference}': {path} does not exist; give a local copy of the "
                               f"ADM evaluator's reference batch (e.g. VIRTUAL_imagenet256_labeled.npz); nothing is downloaded")
        if cfg.feature_space != "inception":
            raise MetricsError(f"evaluate.reference '{cfg.reference}' holds Inception statistics; "
                               f"set evaluate.feature_space: inception")
        extra = sorted(set(cfg.metrics) - ADM_ONLY_METRICS)
        if extra:
            raise MetricsError(f"evaluate.metrics {extra} need reference features, but an ADM reference batch "
                               f"(evaluate.reference) holds only mu/sigma; use evaluate.metrics: [fid, isc]")
    elif kind == "folder":
        if not path.is_dir() or not any(p.suffix.lower() in IMAGE_SUFFIXES for p in path.iterdir()):
            raise MetricsError(f"evaluate.reference '{cfg.reference}': {path} is not a folder of .png/.jpg images")
    return kind, path


def load_adm_reference(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """mu (D,) and sigma (D, D), float64, of an ADM reference batch (keys arr_0, mu, sigma[, mu_s, sigma_s])."""
    try:
        with np.load(path) as npz:
            mu, sigma = np.asarray(npz["mu"], dtype=np.float64), np.asarray(npz["sigma"], dtype=np.float64)
    except (KeyError, ValueError, OSError) as e:
        raise MetricsError(f"evaluate.reference {path}: not an ADM reference batch with 'mu' and 'sigma' ({e})") from None
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise MetricsError(f"evaluate.reference {path}: mu {mu.shape} / sigma {sigma.shape} are not (D,) / (D, D)")
    return {"mu": mu, "sigma": sigma}


def fid_protocol(cfg: EvaluateConfig, *, num_samples: int, sampling: SamplingSettings, steps: int | None,
                 scales: list | None = None) -> dict[str, Any]:
    """What an FID was measured with, to hold it against the paper's (ADM reference, 50k samples, guidance,
    top-k/top-p, steps, greedy rule): a flat dict (the SamplingSettings' own fields), and its one-line `summary`."""
    ref = cfg.reference or f"split:{cfg.reference_split}"
    s = sampling
    proto = {"reference": ref, "feature_space": cfg.feature_space, "num_samples": int(num_samples),
             **s.model_dump(mode="json"), "steps": steps, "scales": " ".join(f"{h}x{w}" for h, w in scales or [])}
    proto["summary"] = (f"{ref} · {cfg.feature_space} · n={num_samples} · "
                        f"guidance {s.guidance:g} {s.guidance_schedule} · "
                        f"top-k {s.top_k} · top-p {s.top_p:g} · {steps} steps · greedy {s.greedy_rule}")
    return proto


def _fidelity_kwargs(cfg: EvaluateConfig, extractor: str, weights: Path, n1: int, n2: int,
                     device: torch.device, seed: int, workers: bool = False) -> dict:
    want = set(cfg.metrics)
    if "kid" in want and min(n1, n2) < 2:
        raise MetricsError(f"KID needs at least 2 images on each side (got {n1} samples, {n2} reference)")
    return dict(
        feature_extractor=extractor, feature_extractor_weights_path=str(weights),
        fid="fid" in want, isc="isc" in want, kid="kid" in want, prc="prc" in want,
        kid_subset_size=min(cfg.kid_subset_size, n1, n2), isc_splits=max(1, min(10, n1 // 2)),
        prc_batch_size=prc_rows(n1, n2),
        cuda=device.type == "cuda" and torch.cuda.is_available(), batch_size=64,
        save_cpu_ram=not workers,   # workers: torch-fidelity's DataLoader decodes in worker processes
        rng_seed=seed, verbose=False,
    )


def prc_rows(n1: int, n2: int) -> int:
    """Rows per block of precision/recall's pairwise distances: a block is rows x max(n1, n2) distances."""
    return max(64, PRC_BLOCK_DISTANCES // max(n1, n2, 1))


def name_metrics(raw: dict[str, float], feature_space: str) -> dict[str, float]:
    """torch-fidelity keys -> '<metric>_<feature space>' (fid_domain, isc_inception, ...)."""
    return {f"{_RENAME[k]}_{feature_space}": float(v) for k, v in raw.items() if k in _RENAME}


def compute_reference(reference_NCHW: torch.Tensor | Dataset | None, out_dir: str | os.PathLike, cfg: EvaluateConfig,
                      feature_net_path: str | os.PathLike | None, device: torch.device, seed: int,
                      workers: bool = False) -> dict:
    """Extract and cache the reference split's features (and FID statistics) in `out_dir`.

    `reference_NCHW` is the prepared split's images — a uint8 (N, 3, H, W) tensor or a Dataset of
    uint8 (3, H, W) images read from disk (then `workers` lets torch-fidelity's DataLoader decode in
    worker processes) — or None when `evaluate.reference` names the source.
    Returns the reference scored against itself: IS of real data (an upper bound for samples),
    FID and KID ~ 0 as a sanity check (an ADM batch: its statistics are checked only). Precision and
    recall of a set against itself are 1 by construction and cost N^2 distances (all held at once in
    torch-fidelity's parallel-decoding mode: 10 GB per matrix at 50,000 images), so only the features
    they need are cached.
    """
    kind, path = reference_source(cfg)
    extractor, weights = feature_weights(cfg, feature_net_path)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = reference_name(cfg, weights)
    info = {"cache_name": name, "source": cfg.reference or f"split:{cfg.reference_split}",
            "feature_space": cfg.feature_space, "metrics": sorted(cfg.metrics)}
    if kind == "adm":
        info |= {"num_images": None, "feature_dim": len(load_adm_reference(path)["mu"]), "self_metrics": {}}
    else:
        if kind == "folder":
            ref, n = str(path), sum(p.suffix.lower() in IMAGE_SUFFIXES for p in path.iterdir())
        else:
            ref = UInt8Images(reference_NCHW)
            n = len(ref)
        kw = _fidelity_kwargs(cfg, extractor, weights, n, n, device, seed, workers and kind != "folder")
        cached = dict(input1=ref, input1_cache_name=name, cache_root=str(out_dir))
        raw = {} if set(cfg.metrics) == {"prc"} else torch_fidelity.calculate_metrics(
            input2=ref, input2_cache_name=name, **cached, **{**kw, "prc": False})
        if kw["prc"]:   # the features precision/recall read from the cache (a no-op after FID or KID)
            layer = resolve_feature_layer_for_metric("prc", **kw)
            net = create_feature_extractor(extractor, [layer], **{k: v for k, v in kw.items() if k != "feature_extractor"})
            extract_featuresdict_from_input_id_cached(1, net, **cached, **{**kw, "cache": True})
        info |= {"num_images": n, "self_metrics": name_metrics(raw, cfg.feature_space)}
    (out_dir / REFERENCE_INFO).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return info


def compute_metrics(samples_NCHW: torch.Tensor, reference_dir: str | os.PathLike, cfg: EvaluateConfig,
                    feature_net_path: str | os.PathLike | None, device: torch.device, seed: int) -> dict[str, float]:
    """FID/IS/KID/precision/recall of samples against the cached reference, keys named by feature space."""
    extractor, weights = feature_weights(cfg, feature_net_path)
    reference_dir = Path(reference_dir)
    info_path = reference_dir / REFERENCE_INFO
    if not info_path.is_file():
        raise MetricsError(f"{info_path} not found; run the reference_stats stage first")
    info = json.loads(info_path.read_text())
    name = reference_name(cfg, weights)
    if info["cache_name"] != name or info["metrics"] != sorted(cfg.metrics):
        raise MetricsError(f"reference statistics in {reference_dir} were made with other settings "
                           f"({info['cache_name']}, metrics {info['metrics']}; now {name}, {sorted(cfg.metrics)}); "
                           f"rerun the reference_stats stage")
    samples = UInt8Images(samples_NCHW)
    kind, path = reference_source(cfg)
    if kind == "adm":
        return _metrics_vs_adm(samples, load_adm_reference(path), cfg, extractor, weights, device, seed)
    raw = torch_fidelity.calculate_metrics(
        input1=samples, input2=_CachedOnly(info["num_images"], reference_dir), input2_cache_name=name,
        cache_root=str(reference_dir),
        **_fidelity_kwargs(cfg, extractor, weights, len(samples), info["num_images"], device, seed))
    return name_metrics(raw, cfg.feature_space)


def _metrics_vs_adm(samples: UInt8Images, ref: dict[str, np.ndarray], cfg: EvaluateConfig, extractor: str,
                    weights: Path, device: torch.device, seed: int) -> dict[str, float]:
    """FID of the samples' Inception statistics against an ADM reference batch's mu/sigma; IS of the samples."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_input_id_to_statistics, fid_statistics_to_metric

    kw = _fidelity_kwargs(cfg, extractor, weights, len(samples), 2, device, seed)
    out: dict[str, float] = {}
    if "isc" in cfg.metrics:
        raw = torch_fidelity.calculate_metrics(input1=samples, **{**kw, "fid": False, "kid": False, "prc": False})
        out |= name_metrics(raw, cfg.feature_space)
    if "fid" in cfg.metrics:
        layer = resolve_feature_layer_for_metric("fid", **kw)
        net = create_feature_extractor(extractor, [layer], **{k: v for k, v in kw.items() if k != "feature_extractor"})
        stats = fid_input_id_to_statistics(1, net, layer, input1=samples, **kw)
        if stats["mu"].shape != ref["mu"].shape:
            raise MetricsError(f"evaluate.reference holds {ref['mu'].shape[0]}-d statistics; the "
                               f"{cfg.feature_space} features are {stats['mu'].shape[0]}-d")
        ref = {k: v.astype(stats[k].dtype) for k, v in ref.items()}
        out[f"fid_{cfg.feature_space}"] = float(fid_statistics_to_metric(stats, ref, False)[KEY_METRIC_FID])
    return out
