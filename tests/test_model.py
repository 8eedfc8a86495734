"""The ConvNeXt VAE: shapes, no BatchNorm, explicit loss reductions, exchangeable encoder."""

import pytest
import timm
import torch

from common.model import create_encoder, encoder_state_dict, strip_wrapper_prefixes
from common.objectives.vae import ConvNeXtVAE, VAEOutput, vae_loss_per_sample


@pytest.mark.parametrize("size", [64, 128, 224])
def test_reconstruction_has_the_input_size(size):
    model = ConvNeXtVAE("convnext_atto", latent_dim=8, image_size=size, decoder_width=4).eval()
    out = model(torch.rand(2, 3, size, size))
    assert out.reconstruction.shape == (2, 3, size, size)
    assert out.mu.shape == out.logvar.shape == (2, 8)
    assert 0 <= out.reconstruction.min() and out.reconstruction.max() <= 1


def test_default_encoder_is_a_randomly_initialised_convnext_tiny():
    model = ConvNeXtVAE(image_size=64)
    assert model.encoder_name == "convnext_tiny"
    assert model.encoder.num_features == 768
    reference = timm.create_model("convnext_tiny", pretrained=False, num_classes=0)
    assert set(encoder_state_dict(model)) == set(reference.state_dict())


def test_no_batchnorm_anywhere():
    model = ConvNeXtVAE("convnext_atto", latent_dim=8, image_size=64)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert any(isinstance(m, torch.nn.GroupNorm) for m in model.decoder.modules())


def test_unknown_encoder_lists_the_convnext_family():
    with pytest.raises(ValueError, match="convnext_atto"):
        create_encoder("resnet50")


def test_encoder_state_dict_loads_strictly_into_a_plain_timm_backbone():
    model = ConvNeXtVAE("convnext_atto", latent_dim=8, image_size=64)
    backbone = timm.create_model("convnext_atto", pretrained=False, num_classes=0)
    backbone.load_state_dict(encoder_state_dict(model), strict=True)
    x = torch.rand(1, 3, 64, 64)
    assert torch.allclose(backbone.eval()(x), model.encoder.eval()(x))


def test_wrapper_prefixes_are_stripped():
    state = {"_module.encoder.stem.0.weight": torch.zeros(1), "module._orig_mod.decoder.x": torch.ones(1)}
    assert set(strip_wrapper_prefixes(state)) == {"encoder.stem.0.weight", "decoder.x"}


def test_loss_terms_are_per_sample_with_explicit_reductions():
    images = torch.rand(3, 3, 8, 8)
    out = VAEOutput(reconstruction=images.clone(), mu=torch.zeros(3, 4), logvar=torch.zeros(3, 4))
    terms = vae_loss_per_sample(images, out, beta=2.0)
    assert all(t.shape == (3,) for t in terms.values())
    assert torch.allclose(terms["total"], torch.zeros(3))  # perfect reconstruction, posterior = prior
    shifted = VAEOutput(reconstruction=images + 0.1, mu=torch.ones(3, 4), logvar=torch.zeros(3, 4))
    terms = vae_loss_per_sample(images, shifted, beta=2.0)
    assert torch.allclose(terms["reconstruction"], torch.full((3,), 0.01 * 3 * 8 * 8))  # summed over pixels
    assert torch.allclose(terms["kl"], torch.full((3,), 0.5 * 4))  # summed over latent dims
    assert torch.allclose(terms["total"], terms["reconstruction"] + 2.0 * terms["kl"])
