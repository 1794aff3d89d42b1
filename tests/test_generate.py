"""Generation: teacher forcing, KV cache == no cache, seed (in)dependence, any size / aspect, edits."""
import pytest
import torch
from tests.tiny_checkpoint import LATENT, tiny_models

from flexvar.generation.editing import EditError, box_mask, extend, forced_tokens, inpaint, latent_known, outpaint, refine
from flexvar.config import SamplingSettings
from flexvar.generation.generate import generate, make_generator
from flexvar.schedules import ScheduleError, resolve_schedule
from flexvar.generation.sampling import filter_top_k_top_p, guidance_scale, sample_tokens

SAMPLING = SamplingSettings(guidance=1.5, top_k=12, top_p=0.95, precision="fp32")
KW = dict(sampling=SAMPLING)


@pytest.fixture(scope="module")
def gt_models():
    return tiny_models("gt")


def test_guidance_ramp_and_constant():
    assert [guidance_scale(2.0, k, 5) for k in range(5)] == [0.0, 0.5, 1.0, 1.5, 2.0]
    assert guidance_scale(1.8, 9, 13) == pytest.approx(1.8) and guidance_scale(1.8, 12, 13) == pytest.approx(2.4)
    assert guidance_scale(2.0, 0, 5, "constant") == 2.0
    assert guidance_scale(2.0, 0, 1) == 0.0


def test_top_k_top_p_filter_keeps_the_right_tokens():
    logits = torch.log(torch.tensor([[[0.5, 0.3, 0.15, 0.05]]]))
    assert torch.isfinite(filter_top_k_top_p(logits, top_k=2)).tolist() == [[[True, True, False, False]]]
    assert torch.isfinite(filter_top_k_top_p(logits, top_p=0.7)).tolist() == [[[True, True, False, False]]]
    assert torch.isfinite(filter_top_k_top_p(logits, top_p=0.1)).tolist() == [[[True, False, False, False]]]
    draws = sample_tokens(logits.expand(1, 500, 4), top_k=2, generator=make_generator(0))
    assert set(draws.unique().tolist()) == {0, 1}


@pytest.mark.parametrize("prediction", ["gt", "residual"])
def test_kv_cache_equals_no_cache(prediction):
    model, vq = tiny_models(prediction)
    scales = [(1, 1), (2, 2), (3, 4), (6, 8), (8, 8)]
    labels = torch.tensor([0, 1, 2, 3, 1])
    a = generate(model, vq, labels, scales, batch_size=3, seed=7, **KW)
    b = generate(model, vq, labels, scales, batch_size=3, seed=7, use_kv_cache=False, **KW)
    for ta, tb in zip(a.tokens, b.tokens):
        assert torch.equal(ta, tb)
    torch.testing.assert_close(a.images, b.images)
    c = generate(model, vq, labels, scales, batch_size=3, seed=8, **KW)
    assert not all(torch.equal(x, y) for x, y in zip(a.tokens, c.tokens))   # the seed matters when sampling


def test_greedy_without_guidance_does_not_depend_on_the_seed(gt_models):
    model, vq = gt_models
    scales = resolve_schedule(steps=5, train_latent_hw=(LATENT, LATENT), downsample=2)
    labels = torch.arange(4)
    runs = [generate(model, vq, labels, scales, seed=s, decode=False,
                     sampling=SamplingSettings(guidance=0.0, top_k=1, precision="fp32")) for s in (0, 1, 123)]
    for r in runs[1:]:
        assert all(torch.equal(x, y) for x, y in zip(runs[0].tokens, r.tokens))


def test_forced_positions_hold_the_given_tokens(gt_models):
    model, vq = gt_models
    scales = [(1, 1), (2, 2), (4, 4), (8, 8)]
    g = torch.Generator().manual_seed(0)
    forced = []
    for k, (h, w) in enumerate(scales):
        ids = torch.randint(0, 32, (3, h, w), generator=g)
        mask = torch.rand(3, h, w, generator=g) < 0.5
        forced.append(None if k == 0 else (ids, mask))
    out = generate(model, vq, torch.tensor([0, 1, 2]), scales, batch_size=2, forced=forced, decode=False, **KW)
    for k in range(1, len(scales)):
        ids, mask = forced[k]
        assert torch.equal(out.tokens[k][mask], ids[mask])
        assert mask.any() and (~mask).any()


def test_inpaint_keeps_ground_truth_tokens_outside_the_mask(gt_models):
    model, vq = gt_models
    img = torch.rand(1, 3, 16, 16) * 2 - 1
    hole = box_mask((4, 4, 12, 12), (16, 16))
    scales = resolve_schedule(steps=4, train_latent_hw=(LATENT, LATENT), downsample=2)
    out = inpaint(model, vq, img.expand(2, -1, -1, -1), hole, torch.tensor([0, 3]), scales, **KW)
    z = vq.encode(img)
    gt_ids = vq.quantize.nearest(z)[0]                       # final-scale ground truth
    known = latent_known(~hole[None], (LATENT, LATENT))[0]
    assert known.sum() == 64 - 16
    for b in range(2):
        assert torch.equal(out.tokens[-1][b][known], gt_ids[known])
    assert out.images.shape == (2, 3, 16, 16)
    out2 = outpaint(model, vq, img, ~hole, torch.tensor([1]), scales, **KW)      # same edit, mask inverted
    assert torch.equal(out2.tokens[-1][0][known], gt_ids[known])


def test_refine_forces_the_covered_scales_and_grows(gt_models):
    model, vq = gt_models
    img = torch.rand(1, 3, 16, 16) * 2 - 1
    scales = resolve_schedule(steps=6, size_hw=(32, 32), train_latent_hw=(LATENT, LATENT), downsample=2)
    out = refine(model, vq, img, torch.tensor([2]), scales, **KW)
    z = vq.encode(img)
    for hw, tok in zip(scales, out.tokens):
        if max(hw) <= LATENT:
            assert torch.equal(tok, forced_tokens(vq.quantize, z, None, [hw])[0][0])
    assert out.images.shape == (1, 3, 32, 32)


def test_extend_puts_the_image_in_the_centre(gt_models):
    model, vq = gt_models
    img = torch.rand(1, 3, 16, 16) * 2 - 1
    scales = resolve_schedule(steps=5, size_hw=(16, 32), train_latent_hw=(LATENT, LATENT), downsample=2)
    out = extend(model, vq, img, torch.tensor([0]), scales, **KW)
    assert out.images.shape == (1, 3, 16, 32)
    gt_ids = vq.quantize.nearest(vq.encode(img))[0]
    assert torch.equal(out.tokens[-1][0][:, 4:12], gt_ids)


@pytest.mark.parametrize("size, latent", [((32, 32), (16, 16)), ((16, 32), (8, 16)), ((32, 16), (16, 8)),
                                          ((12, 16), (6, 8)), ((24, 24), (12, 12))])
def test_any_size_and_aspect_ratio(gt_models, size, latent):
    model, vq = gt_models
    scales = resolve_schedule(steps=5, size_hw=size, train_latent_hw=(LATENT, LATENT), downsample=2)
    assert scales[-1] == latent and len(scales) == 5
    out = generate(model, vq, torch.tensor([1, 2]), scales, train_side=LATENT,
                   sampling=SAMPLING.model_copy(update={"greedy_rule": "outside"}))
    assert out.images.shape == (2, 3, *size)
    assert [tuple(t.shape[1:]) for t in out.tokens] == scales
    with torch.no_grad():   # the images are the tokenizer's decode of the final token map, at that size
        decoded = vq.decode(vq.quantize.lookup(out.tokens[-1])).clamp(-1, 1)
    torch.testing.assert_close(out.images, decoded)


def test_resolve_schedule_forms_and_errors():
    kw = dict(train_latent_hw=(8, 8), downsample=2)
    assert resolve_schedule(scales=[1, 2, 4, 8], **kw) == [(1, 1), (2, 2), (4, 4), (8, 8)]
    assert resolve_schedule(scales=[1, 2, 4, 8], size_hw=(8, 16), **kw) == [(1, 1), (1, 2), (2, 4), (4, 8)]
    assert resolve_schedule(scales=[(1, 1), (1, 2), (3, 5)], **kw) == [(1, 1), (1, 2), (3, 5)]
    assert resolve_schedule(preset="256-6", **kw)[-1] == (16, 16)
    assert resolve_schedule(steps=8, **kw) == [(s, s) for s in range(1, 9)]
    for bad in (dict(steps=9), dict(scales=[1, 3, 2, 8]), dict(scales=[1, 2, 4], size_hw=(16, 16)),
                dict(steps=3, size_hw=(15, 16)), dict(preset="nope"), dict(steps=2, scales=[1, 2]),
                dict(scales=[(1, 1), (2, 1), (1, 2)])):
        with pytest.raises(ScheduleError):
            resolve_schedule(**bad, **kw)


def test_edits_refuse_residual_models():
    model, vq = tiny_models("residual")
    with pytest.raises(EditError):
        refine(model, vq, torch.zeros(1, 3, 16, 16), torch.tensor([0]), [(1, 1), (8, 8), (16, 16)])
