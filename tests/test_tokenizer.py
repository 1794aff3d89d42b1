"""The scalable VQVAE: any-scale shapes, quantise/decode round trip, save/load and its errors,
the recorded normalisation groups, official-import refusals, training-loop pieces (official numerics:
test_conformance_official.py)."""
from __future__ import annotations

import torch
import pytest

from flexvar.checkpoint import CheckpointError, save_atomic
from flexvar.config import TokenizerConfig, TrainTokenizerConfig
from flexvar.tokenizer.vqvae import VQVAE, load_tokenizer, save_tokenizer
from flexvar.tokenizer.training import TokenizerTrainer, evaluate_scales, sample_scales

SMALL = TokenizerConfig(ch=32, ch_mult=[1, 2], num_res_blocks=1, z_channels=32, codebook_dim=8, codebook_size=64)


@pytest.fixture(scope="module")
def vq() -> VQVAE:
    torch.manual_seed(0)
    return VQVAE(SMALL).eval()


# --------------------------------------------------------------------------- shapes and round trips
@pytest.mark.parametrize("hw", [(1, 1), (3, 5), (8, 12), (16, 24), (7, 2)])
def test_any_scale_shapes(vq, hw):
    """Non-square input; scales from 1x1 to 2x larger than the input's latent, square or not."""
    x = torch.rand(2, 3, 16, 24) * 2 - 1
    with torch.no_grad():
        z = vq.encode(x)
        assert z.shape == (2, 8, 8, 12)
        idx, zq = vq.quantize_at(z, hw)
        assert idx.shape == (2, *hw) and zq.shape == (2, 8, *hw)
        img = vq.decode(zq)
        assert img.shape == (2, 3, 2 * hw[0], 2 * hw[1])
        assert torch.equal(vq.decode_indices(idx), img)


def test_quantize_decode_round_trip(vq):
    """Code vectors are their own nearest codes; decoding ids equals decoding their vectors."""
    idx = torch.randint(0, SMALL.codebook_size, (3, 4, 5))
    zq = vq.quantize.lookup(idx)
    idx2, zq2 = vq.quantize_at(zq, (4, 5))
    assert torch.equal(idx2, idx) and torch.allclose(zq2, zq)
    with torch.no_grad():
        assert torch.allclose(vq.decode_indices(idx), vq.decode(zq))


def test_full_scale_quantisation_uses_unscaled_latent(vq):
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        z = vq.encode(x)
        idx, _ = vq.quantize_at(z, (8, 8))
        assert torch.equal(idx, vq.quantize.nearest(z))


# --------------------------------------------------------------------------- save / load and errors
def test_save_load_round_trip(vq, tmp_path):
    path = save_tokenizer(vq, SMALL, tmp_path / "tok")
    loaded = load_tokenizer(tmp_path / "tok", expect_config=SMALL)
    x = torch.rand(1, 3, 8, 8) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded.encode(x), vq.encode(x))
    assert path.name == "tokenizer.pt"


def test_corrupt_checkpoint_names_file(tmp_path):
    bad = tmp_path / "tokenizer.pt"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match=str(bad)) as e:
        load_tokenizer(tmp_path)
    assert "corrupt" in str(e.value)


def test_wrong_kind_names_file(vq, tmp_path):
    path = tmp_path / "tokenizer.pt"
    save_atomic({"kind": "transformer", "config": {}, "model": {}}, path)
    with pytest.raises(CheckpointError, match=f"{path}.*kind='transformer'.*expected 'tokenizer'"):
        load_tokenizer(path)


def test_config_mismatch_names_file_and_key(vq, tmp_path):
    path = save_tokenizer(vq, SMALL, tmp_path)
    other = SMALL.model_copy(update={"codebook_size": 128})
    with pytest.raises(CheckpointError, match=f"{path}.*codebook_size: checkpoint has 64, settings say 128"):
        load_tokenizer(path, expect_config=other)


def test_weights_not_fitting_config_names_file(vq, tmp_path):
    path = tmp_path / "tokenizer.pt"
    sd = {k: v for k, v in vq.state_dict().items() if not k.startswith("decoder.conv_out")}
    save_atomic({"kind": "tokenizer", "config": SMALL.model_dump(mode="json"), "model": sd}, path)
    with pytest.raises(CheckpointError, match=f"{path}.*do not fit"):
        load_tokenizer(path)


# --------------------------------------------------------------------------- normalisation groups
# Official (LlamaGen/FlexVAE) conformance at narrow widths: tests/test_conformance_official.py, against
# tensors produced by the official code. Here: the group count is a recorded property of the config.
def test_group_count_is_a_recorded_config_property():
    official = VQVAE(TokenizerConfig(ch=32, ch_mult=[1, 2], z_channels=32, codebook_dim=8, codebook_size=16,
                                     norm_groups=32, norm_min_group_channels=1))   # the official layout
    assert {(m.num_channels, m.num_groups) for m in official.modules() if isinstance(m, torch.nn.GroupNorm)} \
        == {(32, 32), (64, 32)}                        # LlamaGen Normalize: GroupNorm(32, C)
    narrow = TokenizerConfig(ch=16, ch_mult=[1, 2, 4], z_channels=32, codebook_dim=8, codebook_size=16,
                             norm_min_group_channels=4)   # the embedded default: >= 4 channels per group
    assert {(m.num_channels, m.num_groups) for m in VQVAE(narrow).modules() if isinstance(m, torch.nn.GroupNorm)} \
        == {(16, 4), (32, 8), (64, 16)}


def test_checkpoint_without_recorded_groups_loads_with_the_rule_it_was_trained_with(tmp_path):
    cfg = TokenizerConfig(ch=16, ch_mult=[1, 2], z_channels=32, codebook_dim=8, codebook_size=16,
                          norm_min_group_channels=4)
    model = VQVAE(cfg)
    old = {k: v for k, v in cfg.model_dump(mode="json").items() if not k.startswith("norm_")}
    save_atomic({"kind": "tokenizer", "config": old, "model": model.state_dict()}, tmp_path / "tokenizer.pt")
    loaded = load_tokenizer(tmp_path)
    assert loaded.cfg == cfg
    x = torch.rand(1, 3, 8, 8) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded.encode(x), model.eval().encode(x))


def test_import_official_rejects_other_files(tmp_path):
    from flexvar.official import import_official_tokenizer

    torch.save({"model": {"foo.weight": torch.zeros(2)}}, tmp_path / "x.pth")
    with pytest.raises(CheckpointError, match="x.pth.*not a LlamaGen/FlexVAR VQ tokenizer"):
        import_official_tokenizer(tmp_path / "x.pth", tmp_path / "out")


# --------------------------------------------------------------------------- training pieces
def test_sample_scales_always_include_full():
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        s = sample_scales(8, 5, gen)
        assert len(s) == 5 and s[-1] == 8 and s == sorted(set(s)) and s[0] >= 1
    assert sample_scales(2, 5, gen) == [1, 2] and sample_scales(8, 1, gen) == [8]


def test_perceptual_needs_local_weights(tmp_path):
    from flexvar.tokenizer.perceptual import PerceptualLoss

    with pytest.raises(FileNotFoundError, match="train_tokenizer.perceptual_weights_path is empty"):
        PerceptualLoss("")
    with pytest.raises(FileNotFoundError, match="train_tokenizer.perceptual_weights_path = .*no such file"):
        PerceptualLoss(tmp_path / "missing.pth")


def _trainer(tmp_path, steps: int, perceptual: bool = False) -> TokenizerTrainer:
    """A tiny trainer with GAN, EMA and dropout on (and the perceptual loss when asked)."""
    extra = {}
    if perceptual:
        from torchvision.models.vgg import cfgs, make_layers

        vgg = tmp_path / "vgg16.pth"
        torch.manual_seed(0)
        features = make_layers(cfgs["D"]).state_dict()       # random VGG16 weights in a local file
        torch.save({f"features.{k}": v for k, v in features.items()}, vgg)
        extra = {"perceptual_weight": 0.1, "perceptual_weights_path": str(vgg)}
    cfg = TrainTokenizerConfig(steps=steps, batch_size=2, warmup_steps=2, precision="fp32", ema_decay=0.9,
                               gan_weight=0.1, gan_start_step=1, num_scales=3, **extra)
    images = torch.randint(0, 256, (6, 3, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    return TokenizerTrainer(SMALL.model_copy(update={"dropout": 0.1}), cfg, seed=3, train_images_NCHW=images,
                            device=torch.device("cpu"))


def test_training_with_perceptual_and_gan_losses(tmp_path):
    t = _trainer(tmp_path, steps=2, perceptual=True)
    logs = [t.train_step() for _ in range(2)]
    assert all(torch.isfinite(torch.tensor(list(lg.values()))).all() for lg in logs)
    assert "perceptual" in logs[0] and "g_adv" not in logs[0] and "d_loss" in logs[1] and "g_adv" in logs[1]


def test_training_exact_resume(tmp_path):
    """GAN + EMA + dropout + several epochs: stop after 3 steps, resume, and end bit-identical."""
    full = _trainer(tmp_path, steps=5)
    full.fit()
    part = _trainer(tmp_path, steps=5)
    for _ in range(3):
        part.train_step()
    part.save(tmp_path / "state.pt")
    torch.manual_seed(12345)                 # clobber the global RNG: resume must restore it
    resumed = _trainer(tmp_path, steps=5)
    assert resumed.resume(tmp_path / "state.pt") and resumed.step == 3
    resumed.fit()
    for name, a, b in [("model", full.model.state_dict(), resumed.model.state_dict()),
                       ("ema", full.ema.state_dict(), resumed.ema.state_dict()),
                       ("disc", full.disc.state_dict(), resumed.disc.state_dict())]:
        for k, v in a.items():
            assert torch.equal(v, b[k]), f"{name}.{k}"


def test_resume_refuses_other_settings(tmp_path):
    t = _trainer(tmp_path, steps=5)
    t.save(tmp_path / "state.pt")
    other = _trainer(tmp_path, steps=6)
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'state.pt'}.*train.steps: checkpoint has 5, settings say 6"):
        other.resume(tmp_path / "state.pt")


def test_evaluate_scales_reports_every_scale(vq):
    images = torch.randint(0, 256, (5, 3, 16, 16), dtype=torch.uint8)
    ev = evaluate_scales(vq, images, [1, 2, 8], torch.device("cpu"), batch_size=2)
    assert set(ev["per_scale"]) == {1, 2, 8}
    assert 0 < ev["usage"] <= 1 and ev["perplexity"] >= 1


def test_inference_in_place_ops_match_the_autograd_path_and_leave_inputs_alone():
    """Without autograd the encoder/decoder apply SiLU and residual adds in place; the images equal
    those of the out-of-place path, and the caller's tensors are not modified."""
    torch.manual_seed(0)
    model = VQVAE(SMALL).eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    x_copy = x.clone()
    with torch.no_grad():
        z = model.encode(x)
        z_copy = z.clone()
        rec = model.decode(z)
    assert torch.equal(x, x_copy) and torch.equal(z, z_copy)
    torch.testing.assert_close(model.encode(x).detach(), z)
    torch.testing.assert_close(model.decode(z).detach(), rec)
