"""LPIPS-VGG as the student's perceptual term (losses.lpips): zero exactly at the target and positive elsewhere, the
same number as the reference implementation (pyiqa's port of the lpips package) given the same weights, the lpips
package's file layout, and its place in the data term."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from losses.lpips import LPIPS, LPIPS_CHANNELS, lpips_key
from losses.onestep import data_loss
from tests.train_helpers import vgg_init_


def write_lin_weights(path: Path, seed: int = 0) -> Path:
    """Random non-negative linear layers in the lpips package's layout (``lin<i>.model.1.weight``, (1,C,1,1))."""
    gen = torch.Generator().manual_seed(seed)
    torch.save({lpips_key(i): torch.rand(1, c, 1, 1, generator=gen) for i, c in enumerate(LPIPS_CHANNELS)}, path)
    return path


@pytest.fixture(scope="module")
def lpips(tmp_path_factory) -> LPIPS:
    net = LPIPS(write_lin_weights(tmp_path_factory.mktemp("lpips") / "vgg.pth"), None, allow_random_init=True)
    vgg_init_(net.vgg, seed=1)
    return net


def images(seed: int, n: int = 2, size: int = 48) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_lpips_is_zero_exactly_at_the_target_and_positive_elsewhere(lpips):
    target = images(0)
    assert torch.equal(lpips(target, target), torch.zeros(2))
    for scale in (0.05, 0.3):
        noisy = (target + scale * torch.randn(target.shape, generator=torch.Generator().manual_seed(2))).clamp(-1, 1)
        assert (lpips(noisy, target) > 0).all()
    assert (lpips(images(3), target) > lpips((target + 0.05).clamp(-1, 1), target)).all()


def test_lpips_equals_the_reference_implementation_with_the_same_weights(lpips, monkeypatch):
    arch = pytest.importorskip("pyiqa.archs.lpips_arch")
    random_vgg16 = arch.models.vgg16  # torchvision's, unpatched: no download, random weights replaced below
    monkeypatch.setattr(arch.models, "vgg16", lambda weights=None: random_vgg16(weights=None))
    reference = arch.LPIPS(pretrained=False, net="vgg", version="0.1").eval()
    ours = {f"features.{k}": v for k, v in lpips.vgg.body.state_dict().items()}
    state = {}
    for name in reference.state_dict():
        if name.startswith("net.slice"):
            state[name] = ours[f"features.{name.split('.', 2)[2]}"]
        elif name.startswith("lins."):  # the same layers under a second name (a ModuleList)
            state[name] = getattr(lpips, f"lin{name.split('.')[1]}")
        elif name.startswith("lin"):
            state[name] = getattr(lpips, name.split(".")[0])
        else:
            state[name] = reference.state_dict()[name]
    reference.load_state_dict(state)
    x, y = images(4), images(5)
    with torch.no_grad():
        want = reference(x, y, normalize=False).reshape(-1)
    torch.testing.assert_close(lpips(x, y), want, rtol=1e-5, atol=1e-7)


def test_lpips_file_must_hold_the_packages_linear_layers(tmp_path):
    torch.save({"lin0.weight": torch.rand(1, 64, 1, 1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="'lin0.model.1.weight' of shape \\(1, 64, 1, 1\\) missing"):
        LPIPS(tmp_path / "bad.pth", None, allow_random_init=True)


def test_data_term_with_lpips_names_it_and_is_minimised_by_the_target(lpips):
    target, pred = images(6), images(7)
    terms = data_loss(pred, target, mse_weight=1.0, perceptual_weight=2.0, lpips=lpips)
    assert set(terms) == {"mse", "lpips", "data"}
    torch.testing.assert_close(terms["data"], terms["mse"] + 2.0 * lpips(pred, target).mean())
    assert data_loss(target, target, perceptual_weight=2.0, lpips=lpips)["data"] == 0
