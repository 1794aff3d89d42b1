"""extract_latents stage: the cache holds the tokenizer encoder's latents of every image and of its
horizontal flip, computed here by calling the encoder directly on the prepared images."""
from __future__ import annotations

import torch
import yaml

from flexvar.config import TokenizerConfig
from flexvar.data.latent_cache import load_latents
from flexvar.data.splits import load_split, to_unit_range
from flexvar.tokenizer.vqvae import VQVAE, save_tokenizer
from tests.tiny_latents import TINY_TOKENIZER


def test_stage_caches_the_encoder_latents_of_each_image_and_its_flip(tiny_prepared, tmp_path, monkeypatch):
    from pipeline.extract_latents import main

    torch.manual_seed(0)
    vqvae = VQVAE(TokenizerConfig(**TINY_TOKENIZER)).eval()
    save_tokenizer(vqvae, TokenizerConfig(**TINY_TOKENIZER), tmp_path / "tok")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({
        "data": {"resolution": 32}, "tokenizer": TINY_TOKENIZER, "resources": {"num_threads": 1},
        "tracking": {"uri": "http://127.0.0.1:9", "required": False}}))
    monkeypatch.chdir(tmp_path)
    assert main(["--params", "params.yaml", "--prepared", str(tiny_prepared), "--tokenizer", "tok",
                 "--out", "lat"]) == 0
    for split in ("train", "val"):
        images = load_split(tiny_prepared, split)
        cached = load_latents(tmp_path / "lat", split)
        x = to_unit_range(images.take(torch.arange(len(images))))
        with torch.no_grad():
            ref_N2CHW = torch.stack([vqvae.encode(x), vqvae.encode(x.flip(-1))], dim=1)
        assert cached.latents_N2CHW.shape == ref_N2CHW.shape == (len(images), 2, 8, 8, 8)
        assert torch.equal(cached.labels_N, images.labels_N)
        err = (cached.latents_N2CHW - ref_N2CHW).abs().max() / ref_N2CHW.abs().max()
        assert err <= 1e-5, f"{split}: cached latents differ from the encoder's by {float(err):.2e} (relative)"
