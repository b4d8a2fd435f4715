import pytest
import torch

from model.text_processor import TextConditionProcessor, pooled


def _inputs(b: int = 2, length: int = 77, dim: int = 16, f: int = 5):
    g = torch.Generator().manual_seed(0)
    return torch.randn(b, length, dim, generator=g), torch.rand(b, f, generator=g)


def test_identity_at_init():
    tokens, feat = _inputs()
    proc = TextConditionProcessor(dim=16, fog_feat_dim=5)
    assert torch.equal(proc(tokens, feat), tokens)
    assert torch.equal(proc(tokens, None), tokens)


def test_parameters_get_gradients_and_change():
    torch.manual_seed(0)
    tokens, feat = _inputs()
    target = torch.randn(tokens.shape, generator=torch.Generator().manual_seed(1))
    proc = TextConditionProcessor(dim=16, fog_feat_dim=5)
    before = {n: p.detach().clone() for n, p in proc.named_parameters()}
    opt = torch.optim.Adam(proc.parameters(), lr=1e-2)

    def step() -> None:
        opt.zero_grad()
        ((proc(tokens, feat) - target) ** 2).mean().backward()
        opt.step()

    step()
    zero_init = ["enhance.3.weight", "enhance.3.bias", "modulate.2.weight", "modulate.2.bias"]
    for name in zero_init:
        assert not torch.equal(dict(proc.named_parameters())[name], before[name]), name
    assert not torch.equal(proc(tokens, feat), tokens)
    step()
    for name, p in proc.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        assert not torch.equal(p, before[name]), name


def test_modulation_formula():
    tokens, feat = _inputs(dim=4, f=3)
    proc = TextConditionProcessor(dim=4, fog_feat_dim=3)
    with torch.no_grad():
        proc.modulate[-1].bias.copy_(torch.tensor([0.5, 0.0, -1.0, 2.0, 1.0, 2.0, 3.0, 4.0]))
    gamma = torch.tensor([0.5, 0.0, -1.0, 2.0])
    beta = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert torch.allclose(proc(tokens, feat), tokens * (1 + gamma) + beta)


def test_bad_shapes():
    proc = TextConditionProcessor(dim=8, fog_feat_dim=3)
    with pytest.raises(ValueError, match="tokens"):
        proc(torch.zeros(2, 77, 9), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="fog_feat"):
        proc(torch.zeros(2, 77, 8), torch.zeros(2, 4))


def test_pooled_mean_and_eot():
    tokens = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    assert torch.equal(pooled(tokens), tokens.mean(dim=1))
    ids = torch.tensor([[49406, 320, 49407, 0], [49406, 49407, 0, 0]])
    assert torch.equal(pooled(tokens, ids), torch.stack([tokens[0, 2], tokens[1, 1]]))
