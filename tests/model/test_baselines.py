"""The baseline networks: published parameter counts, shapes, value conventions, and the J formulas each network's
output head implements."""
from __future__ import annotations

import pytest
import torch

from haze.scattering import rehaze
from model.baselines.aodnet import AODNet
from model.baselines.deblurgan import PatchCritic, ResnetGenerator
from model.baselines.dehazeformer import DehazeFormer
from model.baselines.mscnn import MSCNN, airlight_from_transmission


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_aodnet_has_the_published_1761_parameters():
    assert n_params(AODNet()) == 1761


@pytest.mark.parametrize("size,count", [("t", 687_404), ("s", 1_284_884), ("b", 2_517_612)])
def test_dehazeformer_sizes_match_the_published_counts(size, count):
    net = DehazeFormer(size)
    assert n_params(net) == count
    published = {"t": 0.687e6, "s": 1.285e6, "b": 2.518e6}[size]
    assert abs(count - published) < 0.0005e6


def test_deblurgan_published_sizes_and_cpu_variant():
    assert n_params(ResnetGenerator()) == 11_378_179  # 64 channels, 9 blocks
    assert n_params(PatchCritic()) == 2_764_737  # the 70x70 PatchGAN with 64 channels
    assert n_params(ResnetGenerator(16, 3)) < n_params(ResnetGenerator()) / 40


@pytest.mark.parametrize("net", [AODNet(), DehazeFormer("t", depths=(1, 1, 2, 1, 1)), ResnetGenerator(8, 1), MSCNN()],
                         ids=["aodnet", "dehazeformer", "deblurgan", "mscnn"])
def test_restore_keeps_the_size_and_gives_images_in_0_1(net):
    torch.manual_seed(0)
    h, w = (36, 44) if net.size_multiple > 1 else (37, 45)
    img = torch.rand(2, 3, h, w)
    out = net.restore(img)
    assert out.shape == img.shape and out.min() >= 0 and out.max() <= 1
    assert not out.requires_grad


def test_aodnet_is_identity_when_k_is_one():
    """J = ReLU(K I - K + b), b = 1: K = 1 everywhere gives J = I."""
    net = AODNet()
    with torch.no_grad():
        net.conv5.weight.zero_()
        net.conv5.bias.fill_(1.0)
    img = torch.rand(1, 3, 20, 24)
    assert torch.allclose(net(img), img, atol=1e-6)


def test_dehazeformer_head_gives_j_equal_k_i_minus_b_plus_i():
    """With the head's K = k and B = b constant, J = k I - b + I on [-1,1] images, whatever the backbone does."""
    net = DehazeFormer("t", depths=(1, 1, 2, 1, 1))
    conv = net.head[0]
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.copy_(torch.tensor([0.5, 0.1, -0.2, 0.3]))
    img = torch.rand(1, 3, 35, 37)
    x = img * 2 - 1
    expected = (0.5 * x - torch.tensor([0.1, -0.2, 0.3]).view(1, 3, 1, 1) + x) * 0.5 + 0.5
    assert torch.allclose(net(img), expected, atol=1e-5)


def test_deblurgan_generator_is_residual_and_critic_is_patchwise():
    gen = ResnetGenerator(8, 2)
    with torch.no_grad():
        gen.body[-2].weight.zero_()
        gen.body[-2].bias.zero_()
    img = torch.rand(2, 3, 32, 40)
    assert torch.allclose(gen(img), img, atol=1e-6)
    scores = PatchCritic(8)(img)
    assert scores.shape[:2] == (2, 1) and scores.shape[-1] > scores.shape[-2] > 1


def test_mscnn_predicts_a_transmission_in_0_1_from_coarse_and_fine_nets():
    net = MSCNN()
    img = torch.rand(2, 3, 32, 48)
    t = net(img)
    assert t.shape == (2, 1, 32, 48) and 0 < t.min() and t.max() < 1
    t.mean().backward()
    assert net.coarse[0][0].weight.grad.abs().sum() > 0 and net.fine_first[0].weight.grad.abs().sum() > 0


def test_mscnn_airlight_is_the_brightest_hazy_pixel_among_the_lowest_transmissions():
    img = torch.full((1, 3, 40, 50), 0.2)
    t = torch.linspace(0.05, 1.0, 2000).view(1, 1, 40, 50)  # the 2 lowest t: flat indices 0 and 1 (0.1 % of 2000)
    img[0, :, 0, 1] = torch.tensor([0.7, 0.8, 0.9])
    img[0, :, 30, 30] = 1.0  # brighter, but not among the lowest t
    assert torch.allclose(airlight_from_transmission(img, t), torch.tensor([[0.7, 0.8, 0.9]]))


class KnownTransmission(MSCNN):
    """MSCNN whose forward returns a fixed t (the dehazing step alone)."""

    def __init__(self, t: torch.Tensor) -> None:
        super().__init__(t_floor=0.0)
        self.t = t

    def forward(self, img01: torch.Tensor) -> torch.Tensor:
        return self.t


def test_mscnn_restore_inverts_the_atmospheric_model_with_its_airlight_rule():
    torch.manual_seed(0)
    t = torch.linspace(0.2, 0.95, 32 * 32).view(1, 1, 32, 32)
    airlight = torch.tensor([[0.9, 0.85, 0.8]])
    clean = torch.rand(1, 3, 32, 32) * 0.6
    clean[0, :, 0, 0] = airlight[0]  # among the lowest t, this pixel's hazy value is A itself and the brightest
    hazy = rehaze(clean, t, airlight)
    assert torch.allclose(KnownTransmission(t).restore(hazy), clean, atol=1e-5)
