"""setup_run: the one transformer-run setup of the train_transformer stage, the sweep and the figure scripts."""
from __future__ import annotations

import pytest
import torch

from flexvar.config import load_params
from flexvar.errors import UsageError
from flexvar.tokenizer.vqvae import VQVAE, save_tokenizer
from flexvar.transformer.training_run import setup_run
from tests.flows_support import stage_workdir
from tests.tiny_latents import TINY_TOKENIZER


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return stage_workdir(tmp_path_factory.mktemp("run"), {"transformer": {"pos_embed_size": 4}})


def test_setup_follows_params_and_the_cached_latents(workdir):
    params = load_params(workdir / "params.yaml")
    run = setup_run(params, 1, workdir / "lat", workdir / "tok")
    assert run.train.latent_hw == (8, 8) and len(run.train) == 64 and len(run.val) == 16
    assert run.model.pe_size == 4                      # transformer.pos_embed_size, not the latent side
    assert run.model.num_classes == 4 and run.model.vocab_size == TINY_TOKENIZER["codebook_size"]
    assert run.transformer.depth == 1 and run.transformer.prediction == "gt"
    residual = setup_run(params, 1, workdir / "lat", workdir / "tok", prediction="residual")
    assert residual.model.cfg.prediction == "residual" == residual.transformer.prediction
    fp = run.fingerprint(params.train_transformer, params, panel={"a": [(1, 1)]})
    assert fp["latents"] == [64, 16, [8, 8]] and fp["tokenizer_sha256"] == run.tokenizer_sha256 and "panel" in fp
    assert fp != residual.fingerprint(params.train_transformer, params, panel={"a": [(1, 1)]})


def test_latents_of_another_tokenizer_are_refused_naming_it(workdir, tmp_path):
    from flexvar.config import TokenizerConfig

    tcfg = TokenizerConfig(**TINY_TOKENIZER)
    torch.manual_seed(1)
    save_tokenizer(VQVAE(tcfg), tcfg, tmp_path / "other")
    with pytest.raises(UsageError, match=r"^--tokenizer: .*extracted with another tokenizer"):
        setup_run(load_params(workdir / "params.yaml"), 1, workdir / "lat", tmp_path / "other")
    with pytest.raises(UsageError, match=r"^--latents: "):
        setup_run(load_params(workdir / "params.yaml"), 1, tmp_path / "no_latents", workdir / "tok")
