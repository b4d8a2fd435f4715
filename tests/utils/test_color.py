import pytest
import torch

from utils.color import rgb_to_ycbcr, ycbcr_to_rgb


def test_round_trip_float32():
    g = torch.Generator().manual_seed(0)
    img01 = torch.rand(2, 3, 16, 20, generator=g)
    back = ycbcr_to_rgb(rgb_to_ycbcr(img01))
    assert back.dtype == torch.float32
    assert (back - img01).abs().max().item() < 1e-5


def test_round_trip_float64_exact():
    g = torch.Generator().manual_seed(1)
    img01 = torch.rand(1, 3, 8, 8, generator=g, dtype=torch.float64)
    back = ycbcr_to_rgb(rgb_to_ycbcr(img01))
    assert (back - img01).abs().max().item() < 1e-12


@pytest.mark.parametrize(
    "rgb, ycc",
    [
        ((1.0, 1.0, 1.0), (1.0, 0.5, 0.5)),
        ((0.0, 0.0, 0.0), (0.0, 0.5, 0.5)),
        ((1.0, 0.0, 0.0), (0.299, 0.5 - 0.1687, 1.0)),
        ((0.0, 1.0, 0.0), (0.587, 0.5 - 0.3313, 0.5 - 0.4187)),
        ((0.0, 0.0, 1.0), (0.114, 1.0, 0.5 - 0.0813)),
    ],
)
def test_forward_bt601_constants(rgb, ycc):
    img01 = torch.tensor(rgb, dtype=torch.float64).view(1, 3, 1, 1)
    out = rgb_to_ycbcr(img01).view(3)
    assert torch.allclose(out, torch.tensor(ycc, dtype=torch.float64), atol=1e-12)


def test_gradient_flows():
    img01 = torch.rand(1, 3, 4, 4, requires_grad=True)
    rgb_to_ycbcr(img01)[:, 0].sum().backward()
    expected = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1).expand(1, 3, 4, 4)
    assert torch.allclose(img01.grad, expected, atol=1e-6)


def test_bad_shape_raises():
    with pytest.raises(ValueError, match="img01"):
        rgb_to_ycbcr(torch.rand(3, 4, 4))
    with pytest.raises(ValueError, match="ycc"):
        ycbcr_to_rgb(torch.rand(1, 1, 4, 4))
