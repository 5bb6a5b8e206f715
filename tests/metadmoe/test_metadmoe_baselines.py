"""ERM / BN-adapt / TENT baselines: what each may change, and that the source model is never touched."""

import pytest
import torch
from torch import nn

from transferlab.core.errors import UserError
from transferlab.metadmoe import ERM, BNAdapt, Tent

from .helpers import TinyNet, batch, same_state, state


def _trained():
    torch.manual_seed(0)
    net = TinyNet().double()
    erm = ERM(net, lr=1e-2)
    for s in range(20):
        x, y = batch(32, seed=s)
        erm.update(x, y)
    return net.eval()


def test_erm_update_lowers_the_training_loss():
    torch.manual_seed(0)
    net = TinyNet().double()
    erm = ERM(net, lr=1e-2)
    x, y = batch(64)
    first = erm.update(x, y)["loss"]
    for _ in range(30):
        last = erm.update(x, y)["loss"]
    assert last < first - 0.1
    assert erm.predict(x).shape == (64, 3)


def test_tent_updates_only_bn_affine_parameters():
    net = _trained()
    source = state(net)
    tent = Tent(net, lr=1e-2, episodic=False)
    before = {n: p.detach().clone() for n, p in tent.model.named_parameters()}
    x, _ = batch(32, seed=99)
    tent.update(x)
    for n, p in tent.model.named_parameters():
        changed = not torch.equal(p, before[n])
        assert changed == n.startswith("body.1."), n  # body.1 is the BatchNorm layer
    assert same_state(source, state(net))  # the source model is untouched


def test_tent_episodic_reset_and_entropy_decrease():
    net = _trained()
    tent = Tent(net, lr=1e-2, steps=1, episodic=True)
    x, _ = batch(32, seed=99)
    p1 = (tent.update(x), tent.predict(x))[1]
    p2 = (tent.update(x), tent.predict(x))[1]
    torch.testing.assert_close(p1, p2, atol=0, rtol=0)  # episodic: same start, same result
    online = Tent(net, lr=1e-2, steps=1, episodic=False)
    e = [online.update(x)["entropy"] for _ in range(10)]
    assert e[-1] < e[0]


def test_bn_adapt_uses_test_batch_statistics():
    net = _trained()
    source = state(net)
    x, _ = batch(32, seed=7)
    x = 3 * x + 2  # a shifted domain
    bn = BNAdapt(net)
    with torch.no_grad():
        h = net.body[0](x)
        z = (h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + 1e-5)
        ref = net.head(net.body[3](torch.tanh(z * net.body[1].weight + net.body[1].bias)))
    torch.testing.assert_close(bn.predict(x), ref)
    assert not torch.allclose(bn.predict(x), net(x))
    assert same_state(source, state(net))


def test_baselines_reject_models_without_batchnorm_or_bad_batches():
    class NoBN(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(6, 3)

        def features(self, x):
            return x

        def head(self, z):
            return self.lin(z)

    with pytest.raises(UserError, match="BatchNorm"):
        Tent(NoBN())
    tent = Tent(_trained())
    with pytest.raises(UserError, match="non-empty"):
        tent.update(torch.zeros(0, 6, dtype=torch.float64))
    with pytest.raises(UserError, match="NaN"):
        tent.update(torch.full((4, 6), float("nan"), dtype=torch.float64))
