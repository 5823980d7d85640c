"""The VAE: the SD ft-mse architecture, the wrapper's scaling, and strict loading of its folder."""

from __future__ import annotations

import pytest
import torch

from lipsync.checkpoints import load_vae
from lipsync.errors import CheckpointError
from lipsync.models.vae import (
    SCALING_FACTOR,
    SD_VAE_FT_MSE_CONFIG,
    build_autoencoder,
    random_vae,
)
from tests.support.model_files import write_vae_folder


def test_sd_vae_ft_mse_architecture():
    with torch.device("meta"):
        model = build_autoencoder(SD_VAE_FT_MSE_CONFIG)
    assert sum(p.numel() for p in model.parameters()) == 83_653_863
    assert SCALING_FACTOR == 0.18215


def test_vae_encode_is_scaled_posterior_mean_and_decode_inverts_scale():
    vae = random_vae()
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.inference_mode():
        z = vae.encode(x)
        mean = vae.autoencoder.encode(x).latent_dist.mean
        assert z.shape == (2, 4, 8, 8)
        torch.testing.assert_close(z, mean * SCALING_FACTOR)
        torch.testing.assert_close(vae.decode(z), vae.autoencoder.decode(mean).sample)


def deprecated_names(state):
    out = {}
    for k, v in state.items():
        if ".attentions." in k:
            k = (
                k.replace(".to_q.", ".query.")
                .replace(".to_k.", ".key.")
                .replace(".to_v.", ".value.")
                .replace(".to_out.0.", ".proj_attn.")
            )
        out[k] = v
    return out


def test_load_vae_folder_strict_with_old_attention_names(tmp_path):
    source = random_vae(seed=3)
    state = {k: v.contiguous() for k, v in source.autoencoder.state_dict().items()}
    write_vae_folder(tmp_path / "vae", deprecated_names(state))
    loaded = load_vae(tmp_path / "vae", dtype=torch.float16)
    assert next(loaded.autoencoder.parameters()).dtype == torch.float16
    for k, v in loaded.autoencoder.state_dict().items():
        assert torch.equal(v, state[k].half()), k


def test_load_vae_refuses_partial_files(tmp_path):
    state = {k: v.contiguous() for k, v in random_vae().autoencoder.state_dict().items()}
    state.pop("decoder.conv_out.weight")
    write_vae_folder(tmp_path / "vae", state)
    with pytest.raises(CheckpointError, match="1 missing keys \\(e.g. decoder.conv_out.weight\\)"):
        load_vae(tmp_path / "vae")
