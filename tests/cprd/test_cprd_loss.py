"""CPRD loss: order optimality, monotone invariance, gradient isolation, vectorisation, symmetry, errors."""

import itertools
import math

import pytest
import torch

from transferlab.core.errors import UserError
from transferlab.cprd import CPRDConfig, CPRDLoss, cprd_loss, mine_hard_negatives
from transferlab.cprd.loss import partial_ranking_nll


def one_anchor(student, teacher):
    """One anchor, candidates = the given list + one positive at the end (score 1)."""
    s = torch.cat([torch.as_tensor(student, dtype=torch.float), torch.ones(1)])[None]
    t = torch.cat([torch.as_tensor(teacher, dtype=torch.float), torch.ones(1)])[None]
    pos = torch.zeros_like(s, dtype=torch.bool)
    pos[0, -1] = True
    return s, t, pos


def test_spec_reference_values():
    # spec Sec. 7: teacher uniform in [0, 0.02], student 0.6 -> 0.4 in teacher order or reversed, tau 0.05
    t = torch.linspace(0.02, 0.0, 8)
    s_ord = torch.linspace(0.6, 0.4, 8)
    assert cprd_loss(*one_anchor(s_ord, t), k=8, tau=0.05).item() == pytest.approx(0.716, abs=1e-3)
    assert cprd_loss(*one_anchor(s_ord.flip(0), t), k=8, tau=0.05).item() == pytest.approx(3.002, abs=1e-3)


def test_loss_smallest_when_student_reproduces_teacher_order():
    torch.manual_seed(1)
    t = torch.rand(6)
    values = torch.linspace(0.9, 0.1, 6)  # a fixed set of student scores, assigned in every order
    order = t.argsort(descending=True)
    losses = {}
    for perm in itertools.permutations(range(6)):
        s = torch.empty(6)
        s[order] = values[list(perm)]
        losses[perm] = cprd_loss(*one_anchor(s, t), k=6, tau=0.1).item()
    best = min(losses, key=losses.get)
    assert best == tuple(range(6))  # the student's order equals the teacher's
    # and the loss decreases with the margin of a correctly ordered student, towards 0
    margins = [cprd_loss(*one_anchor(-m * torch.arange(6.0)[order.argsort()], t), k=6, tau=0.1).item()
               for m in (0.01, 0.1, 1.0)]
    assert margins[0] > margins[1] > margins[2] > 0
    assert margins[2] < 1e-4  # gap 1.0 / tau 0.1 = 10 logits: about exp(-10)


def test_only_valid_negatives_are_ordered():
    torch.manual_seed(2)
    s, t = torch.randn(8), torch.rand(8)
    base = cprd_loss(*one_anchor(s, t), k=8, tau=0.1, valid="top_m", valid_param=3)
    # permuting student scores among the teacher's ranks 4..8 (invalid) leaves the loss unchanged
    order = t.argsort(descending=True)
    s2 = s.clone()
    tail = order[3:]
    s2[tail] = s[tail[torch.randperm(len(tail))]]
    assert cprd_loss(*one_anchor(s2, t), k=8, tau=0.1, valid="top_m", valid_param=3).item() == pytest.approx(
        base.item(), abs=1e-6)
    # the loss is independent of the positive's score (it never enters the list)
    sa, ta, pos = one_anchor(s, t)
    sa[0, -1] = -5.0
    assert cprd_loss(sa, ta, pos, k=8, tau=0.1, valid="top_m", valid_param=3).item() == pytest.approx(base.item())


@pytest.mark.parametrize("valid,param", [("all", None), ("top_m", 4)])
def test_invariant_under_strictly_increasing_teacher_transform(valid, param):
    torch.manual_seed(3)
    sim = torch.randn(5, 12)
    t = torch.rand(5, 12) * 0.02  # concentrated, like ITM probabilities
    pos = torch.eye(5, 12, dtype=torch.bool)
    ref = cprd_loss(sim, t, pos, k=6, tau=0.07, valid=valid, valid_param=param)
    for f in (lambda x: torch.exp(50 * x), lambda x: torch.log(x + 1e-6), lambda x: 1e3 * x**3 + x):
        assert cprd_loss(sim, f(t), pos, k=6, tau=0.07, valid=valid, valid_param=param).item() == pytest.approx(
            ref.item(), abs=1e-6)


def test_threshold_rule_is_not_transform_invariant():
    s, t, pos = one_anchor(torch.randn(6), torch.tensor([0.9, 0.8, 0.3, 0.2, 0.1, 0.05]))
    a = cprd_loss(s, t, pos, k=6, tau=0.1, valid="threshold", valid_param=0.5)
    b = cprd_loss(s, t * 0.5, pos, k=6, tau=0.1, valid="threshold", valid_param=0.5)  # nothing above 0.5 now
    assert a.item() > 0 and b.item() == 0.0


def test_no_gradient_reaches_the_teacher():
    sim = torch.randn(6, 10, requires_grad=True)
    teacher = torch.nn.Linear(3, 1)
    t = teacher(torch.randn(6, 10, 3)).squeeze(-1)  # a teacher output that tracks gradients
    t_leaf = torch.rand(6, 10, requires_grad=True)
    pos = torch.eye(6, 10, dtype=torch.bool)
    (cprd_loss(sim, t, pos, k=5, tau=0.1) + cprd_loss(sim, t_leaf, pos, k=5, tau=0.1)).backward()
    assert t_leaf.grad is None
    assert all(p.grad is None for p in teacher.parameters())
    assert sim.grad is not None and torch.isfinite(sim.grad).all() and sim.grad.abs().sum() > 0


def reference_loop(sim, t, pos, k, tau, m=None):
    """Per-anchor reference, written as directly from the formula as possible."""
    total = []
    for i in range(sim.shape[0]):
        negs = [j for j in range(sim.shape[1]) if not pos[i, j]]
        negs.sort(key=lambda j: -sim[i, j].item())
        hard = negs[:k]
        ranked = sorted(hard, key=lambda j: -t[i, j].item())
        n_valid = len(ranked) if m is None else min(m, len(ranked))
        terms = []
        for r in range(min(n_valid, len(ranked) - 1)):
            below = ranked[r:]
            logits = torch.stack([sim[i, j] / tau for j in below])
            terms.append(torch.logsumexp(logits, 0) - logits[0])
        total.append(torch.stack(terms).mean() if terms else torch.zeros(()))
    return torch.stack(total).mean()


@pytest.mark.parametrize("m", [None, 3])
def test_vectorised_equals_per_anchor_loop(m):
    torch.manual_seed(4)
    sim = torch.randn(7, 15)
    t = torch.randn(7, 15)
    pos = torch.zeros(7, 15, dtype=torch.bool)
    pos[torch.arange(7), torch.arange(7)] = True
    pos[0, 10] = pos[3, 11] = True  # several positives (captions) for some anchors
    valid, param = ("all", None) if m is None else ("top_m", m)
    fast = cprd_loss(sim, t, pos, k=6, tau=0.05, valid=valid, valid_param=param)
    assert fast.item() == pytest.approx(reference_loop(sim, t, pos, 6, 0.05, m).item(), rel=1e-5)


def test_positives_are_never_mined():
    sim = torch.tensor([[0.9, 0.8, 0.7, 0.1, 0.5, 0.4]])
    pos = torch.tensor([[True, True, False, False, True, False]])
    idx, avail = mine_hard_negatives(sim, pos, 3)
    assert idx.tolist() == [[2, 5, 3]] and avail.all()


def test_both_directions_symmetric():
    torch.manual_seed(5)
    a = torch.randn(8, 8)
    sim = (a + a.t()) / 2  # symmetric similarity and teacher
    b = torch.randn(8, 8)
    t = (b + b.t()) / 2
    pos = torch.eye(8, dtype=torch.bool)
    cfg = CPRDConfig(k=4, weight=1.0)
    one_dir = cprd_loss(sim, t, pos, k=4, tau=0.1)
    out = CPRDLoss(cfg)(sim, pos, t, tau=0.1)
    assert out["distill"].item() == pytest.approx(one_dir.item(), rel=1e-5)
    # general matrices: the text->image term equals the image->text term of the transposed problem
    sim2, t2 = torch.randn(6, 9), torch.randn(6, 9)
    pos2 = torch.zeros(6, 9, dtype=torch.bool)
    pos2[torch.arange(6), torch.arange(6)] = True
    pos2[torch.arange(3), torch.arange(6, 9)] = True
    fwd = CPRDLoss(cfg)(sim2, pos2, t2, tau=0.1)["distill"]
    swapped = CPRDLoss(cfg)(sim2.t(), pos2.t(), t2.t(), tau=0.1)["distill"]
    assert fwd.item() == pytest.approx(swapped.item(), rel=1e-5)
    expect = 0.5 * (cprd_loss(sim2, t2, pos2, k=4, tau=0.1) + cprd_loss(sim2.t(), t2.t(), pos2.t(), k=4, tau=0.1))
    assert fwd.item() == pytest.approx(expect.item(), rel=1e-5)


def test_callable_teacher_matches_matrix_teacher():
    torch.manual_seed(6)
    sim, t = torch.randn(6, 6), torch.randn(6, 6)
    pos = torch.eye(6, dtype=torch.bool)
    calls = []

    def scorer(rows, cols):
        calls.append(len(rows))
        return t[rows, cols]

    loss = CPRDLoss(k=3)
    assert loss(sim, pos, scorer, 0.1)["loss"].item() == pytest.approx(loss(sim, pos, t, 0.1)["loss"].item())
    assert calls == [36]  # only the A x K mined pairs of both directions, in one teacher call


def test_numerics_low_temperature_and_short_rows():
    sim = torch.rand(4, 6) * 2 - 1
    pos = torch.eye(4, 6, dtype=torch.bool)
    loss = cprd_loss(sim.requires_grad_(), torch.randn(4, 6), pos, k=5, tau=0.01)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(sim.grad).all()
    # rows with fewer than two valid candidates contribute exactly zero
    s = torch.randn(3, 4, requires_grad=True)
    out = partial_ranking_nll(s, torch.randn(3, 4), valid="top_m", valid_param=1,
                              available=torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]]).bool(),
                              reduction="none")
    assert out[0].item() == 0.0 and out[1].item() > 0 and torch.isfinite(out).all()


def test_ties_keep_student_order():
    # equal teacher scores: the stable sort keeps the student's (mined) order, so the loss is the
    # Plackett-Luce NLL of the student's own order
    s, t, pos = one_anchor(torch.tensor([0.3, 0.9, 0.5]), torch.zeros(3))
    expect = (math.log(math.exp(9) + math.exp(5) + math.exp(3)) - 9 + math.log(math.exp(5) + math.exp(3)) - 5) / 2
    assert cprd_loss(s, t, pos, k=3, tau=0.1).item() == pytest.approx(expect, rel=1e-5)


def test_bad_input_errors():
    sim, pos = torch.randn(4, 6), torch.eye(4, 6, dtype=torch.bool)
    with pytest.raises(UserError, match="shape"):
        cprd_loss(sim, torch.randn(4, 5), pos, k=2, tau=0.1)
    with pytest.raises(UserError, match="k=6 is larger than the number of negatives"):
        cprd_loss(sim, torch.randn(4, 6), pos, k=6, tau=0.1)
    bad = torch.randn(4, 6)
    bad[1, 2] = float("nan")
    with pytest.raises(UserError, match="NaN"):
        cprd_loss(sim, bad, pos, k=2, tau=0.1)
    with pytest.raises(UserError, match="NaN"):
        CPRDLoss(k=2)(sim[:, :4], torch.eye(4, dtype=torch.bool), lambda r, c: torch.full((len(r),), float("nan")))
    with pytest.raises(UserError, match="tau"):
        cprd_loss(sim, torch.randn(4, 6), pos, k=2, tau=0.0)
    with pytest.raises(UserError, match="valid_param"):
        CPRDConfig(valid="top_m")
    with pytest.raises(ValueError):  # UserError is a ValueError for library users
        cprd_loss(sim, torch.randn(4, 6), pos[:, :5], k=2, tau=0.1)


def test_fast_topk_is_exact():
    from transferlab.cprd.loss import topk_rows

    torch.manual_seed(7)
    x = torch.randn(64, 512)
    x[3, :] = float("-inf")  # a row with nothing minable stays well defined
    x[3, 5] = 1.0
    v, i = topk_rows(x, 16)
    rv, ri = x.topk(16, dim=1)
    assert torch.equal(v, rv) and torch.equal(x.gather(1, i), rv)
    assert all(len(set(r)) == 16 for r in i.tolist())


@pytest.mark.cuda
def test_cuda_matches_cpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    torch.manual_seed(8)
    sim, t = torch.randn(64, 64), torch.randn(64, 64)
    pos = torch.eye(64, dtype=torch.bool)
    cpu = CPRDLoss(k=8)(sim, pos, t, 0.07)["loss"]
    gpu = CPRDLoss(k=8)(sim.cuda(), pos.cuda(), t.cuda(), torch.tensor(0.07, device="cuda"))["loss"]
    assert gpu.item() == pytest.approx(cpu.item(), rel=1e-4)
