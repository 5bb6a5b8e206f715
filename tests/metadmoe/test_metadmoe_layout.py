"""Channels-last fast path of teacher and `adapt` (layout.py): same values, used when it should be, weights kept."""

import pytest
import torch

from transferlab.core.errors import UserError
from transferlab.metadmoe import Aggregator, MetaDMoE, MetaDMoEConfig
from transferlab.metadmoe.layout import to_channels_last, wants_channels_last
from transferlab.nn import SmallCNN
from transferlab.nn.models import FeatureHead

from .helpers import same_state, state

CL = torch.channels_last


def cnn_model(channels_last=None, in_channels=1, dtype=torch.float64):
    torch.manual_seed(0)
    cnn = lambda: SmallCNN(3, in_channels=in_channels, width=4, hidden=8).to(dtype)  # noqa: E731
    experts = [cnn() for _ in range(3)]
    for e in experts:  # non-trivial BN statistics so eval mode differs from batch statistics
        for bn in (e.body[1], e.body[5]):
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2)
    agg = Aggregator(8, heads=2, zero_init=False, dropout=0.0).to(dtype)
    return MetaDMoE(experts, agg, cnn(), MetaDMoEConfig(inner_lr=0.5), input_shape=(in_channels, 28, 28),
                    channels_last=channels_last)


def images(n=4, c=1, dtype=torch.float64, seed=1):
    return torch.rand(n, c, 28, 28, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("c", [1, 3])
def test_to_channels_last_gives_channels_last_strides_even_for_one_channel(c):
    x = images(c=c)
    y = to_channels_last(x)
    assert y.stride() == (784 * c, 1, 28 * c, c)  # .contiguous(memory_format=...) keeps NCHW strides for c == 1
    assert torch.equal(y, x)
    assert to_channels_last(y) is y  # already channels-last: no second copy


def test_policy_is_cpu_4d_by_default_and_can_be_forced():
    x4, x2 = images(), torch.zeros(3, 5)
    assert wants_channels_last(x4, None) and not wants_channels_last(x2, None)
    assert not wants_channels_last(x4, False) and wants_channels_last(x4, True)
    assert not wants_channels_last(x2, True)  # only image batches have a channels-last layout
    with pytest.raises(UserError, match="channels_last"):
        cnn_model(channels_last="yes")


def test_auto_policy_feeds_experts_and_student_channels_last_inputs():
    m = cnn_model()
    seen = []
    hooks = [mod.body[0].register_forward_pre_hook(lambda mod, args: seen.append(args[0].stride()))
             for mod in [*m.experts, m.student]]
    m.adapt(images())
    for h in hooks:
        h.remove()
    assert seen == [(784, 1, 28, 1)] * 4  # 3 experts + the student's inner step, all channels-last


@pytest.mark.parametrize("c", [1, 3])
def test_channels_last_adapt_equals_the_nchw_path(c):
    fast, slow = cnn_model(True, c), cnn_model(False, c)
    x, xq = images(c=c), images(c=c, seed=2)
    torch.testing.assert_close(fast.teacher(x), slow.teacher(x), atol=1e-12, rtol=0)
    a, b = fast.adapt(x), slow.adapt(x)
    assert a.params.keys() == b.params.keys()
    for k in a.params:
        torch.testing.assert_close(a.params[k], b.params[k], atol=1e-12, rtol=0)
    torch.testing.assert_close(a.predict(xq), b.predict(xq), atol=1e-12, rtol=0)
    torch.testing.assert_close(fast.predict(xq), slow.predict(xq), atol=1e-12, rtol=0)
    assert not torch.allclose(a.predict(xq), fast.predict(xq))  # the step did change the student


def test_channels_last_inner_step_equals_hand_computed_nchw_sgd():
    m = cnn_model()
    x = images()
    adapted = m.adapt(x)
    s = m.student.eval()
    with torch.no_grad():  # teacher by plain NCHW module calls
        teacher = m.aggregator.features(torch.stack([e.eval().features(x) for e in m.experts], 1))
    params = list(s.body.parameters())
    grads = torch.autograd.grad(((s.features(x) - teacher) ** 2).mean(), params)
    for (name, p), g in zip(s.body.named_parameters(), grads):
        torch.testing.assert_close(adapted.params["body." + name], p.detach() - 0.5 * g, atol=1e-12, rtol=0)


def test_channels_last_adapt_leaves_weights_and_their_layout_unchanged():
    m = cnn_model()
    before = state(m)
    strides = {k: v.stride() for k, v in m.state_dict().items()}
    m.student.train()
    m.adapt(images())
    assert same_state(before, state(m))
    assert {k: v.stride() for k, v in m.state_dict().items()} == strides
    assert m.student.training


def test_float32_cnn_fast_path_matches_within_float_rounding():
    fast, slow = cnn_model(True, dtype=torch.float32), cnn_model(False, dtype=torch.float32)
    x = images(dtype=torch.float32)
    a, b = fast.adapt(x), slow.adapt(x)
    for k in a.params:
        torch.testing.assert_close(a.params[k], b.params[k], atol=1e-6, rtol=1e-5)


class ViewNet(FeatureHead):
    """A CNN that flattens with `.view`, which fails on a channels-last activation with > 1 channel."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.lin = torch.nn.Linear(4 * 28 * 28, 8)
        self.classifier = torch.nn.Linear(8, 3)

    def features(self, x):
        h = torch.relu(self.conv(x))
        return self.lin(h.view(h.shape[0], -1))


def view_model(channels_last):
    torch.manual_seed(0)
    nets = [ViewNet().double() for _ in range(3)]
    return MetaDMoE(nets, Aggregator(8, heads=2, dropout=0.0).double(), ViewNet().double(), MetaDMoEConfig(),
                    input_shape=(1, 28, 28), channels_last=channels_last)


def test_auto_layout_falls_back_to_nchw_for_backbones_that_cannot_take_channels_last():
    auto, off = view_model(None), view_model(False)
    x, xq = images(), images(seed=2)
    with pytest.raises(RuntimeError, match="view"):  # the backbone really fails on a channels-last batch
        auto.student.features(to_channels_last(x))
    a, b = auto.adapt(x), off.adapt(x)
    assert not auto.layout.works  # learned once, NCHW from now on
    for k in a.params:
        torch.testing.assert_close(a.params[k], b.params[k], atol=0, rtol=0)
    torch.testing.assert_close(a.predict(xq), b.predict(xq), atol=0, rtol=0)
    with pytest.raises(RuntimeError, match="view"):  # forced on: the error is not hidden
        view_model(True).adapt(x)
