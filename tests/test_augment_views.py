"""data.augment official through the real extract_latents stage: K cached views per train image.

A generated ImageNet-layout folder is prepared with data.augment official (short side kept at
ceil(32 / 0.88) = 37), the stage encodes `augment_views` official views of every train image with a
seeded random tokenizer, and training's get_batch reads item i as view i % K of image i // K.
The views' geometry itself is compared with the official function in test_augment_conformance.py.
"""
from __future__ import annotations

import torch
import yaml
from einops import rearrange

from flexvar.config import DataConfig, TokenizerConfig
from flexvar.data.augment import views_loader
from flexvar.data.latent_cache import load_latents
from flexvar.data.prepare import prepare
from flexvar.data.rehearsal import make_imagenet_like
from flexvar.data.splits import load_split, to_unit_range
from flexvar.tokenizer.vqvae import VQVAE, save_tokenizer
from flexvar.transformer.training import get_batch
from tests.tiny_latents import TINY_TOKENIZER

K, RES = 3, 32


def test_official_views_are_cached_per_image_and_read_one_per_item(tmp_path):
    from pipeline.extract_latents import main

    make_imagenet_like(tmp_path / "src", classes=3, train_per_class=3, val_per_class=2, resolution=RES,
                       small_fraction=0.2, corrupt=0, seed=1)
    data = {"source": f"imagefolder:{tmp_path / 'src'}", "resolution": RES, "augment": "official", "augment_views": K}
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"data": data, "tokenizer": TINY_TOKENIZER,
                                      "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}}))
    prepare(DataConfig(**data), seed=0, out_dir=tmp_path / "prepared")
    tcfg = TokenizerConfig(**TINY_TOKENIZER)
    torch.manual_seed(0)
    vq = VQVAE(tcfg).eval()
    save_tokenizer(vq, tcfg, tmp_path / "tok")
    args = ["--params", str(params), "--prepared", str(tmp_path / "prepared"), "--tokenizer", str(tmp_path / "tok")]
    assert main(args + ["--out", str(tmp_path / "lat")]) == 0

    train, val = load_latents(tmp_path / "lat", "train", in_memory_mb=0), load_latents(tmp_path / "lat", "val")
    assert train.latents_N2CHW.shape == (9, K, 8, 8, 8) and train.num_views == K and val.num_views == 2
    # the cache holds, image-major, the encoder's latents of the official views the loader draws (seed 0)
    split = load_split(tmp_path / "prepared", "train", in_memory_mb=0)
    batches = list(views_loader(split, K, RES, seed=0, batch_images=2, num_workers=2))
    views_KCHW = torch.cat([b[0] for b in batches])
    assert views_KCHW.shape == (9 * K, 3, RES, RES)
    assert torch.equal(torch.cat([b[1] for b in batches]), split.labels_N.repeat_interleave(K))
    again = torch.cat([b[0] for b in views_loader(split, K, RES, seed=0, batch_images=4, num_workers=0)])
    assert torch.equal(views_KCHW, again)                       # same views in any worker / batching
    per_image = rearrange(views_KCHW, "(n v) c h w -> n v c h w", v=K)
    assert all(not torch.equal(per_image[n, 0], per_image[n, v]) for n in range(9) for v in range(1, K))
    with torch.no_grad():
        expect = rearrange(vq.encode(to_unit_range(views_KCHW)), "(n v) c h w -> n v c h w", v=K)
    assert torch.allclose(train.latents_N2CHW[torch.arange(9)], expect, atol=1e-5)
    # training: item i = view i % K of image i // K; every (image, view) is an item
    items = torch.randperm(9 * K, generator=torch.Generator().manual_seed(0))
    z, labels = get_batch(train, items, "cpu")
    assert torch.allclose(z, expect[items // K, items % K], atol=1e-5)
    assert torch.equal(labels, split.labels_N[items // K])

    # official views need the prepared pixels around the crop: centre-cropped data is refused
    prepare(DataConfig(**(data | {"augment": "center"})), seed=0, out_dir=tmp_path / "center")
    assert main(["--params", str(params), "--prepared", str(tmp_path / "center"), "--tokenizer",
                 str(tmp_path / "tok"), "--out", str(tmp_path / "lat2")]) == 2
    assert not (tmp_path / "lat2").exists()
