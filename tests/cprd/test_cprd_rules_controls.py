"""Teacher shape checks, the below_positive validity rule, rank sums, controls and the easy-negatives window."""

import math

import pytest
import torch

from transferlab.core.errors import UserError
from transferlab.cprd import (
    CPRDConfig,
    CPRDLoss,
    CPRDSentenceTransformerLoss,
    KLDistillLoss,
    MarginMSEDistillLoss,
    cprd_loss,
    mine_hard_negatives,
)
from transferlab.cprd.loss import partial_ranking_nll


def _batch(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    sim = torch.randn(n, n, generator=g).tanh()
    return sim, torch.eye(n, dtype=torch.bool), torch.randn(n, n, generator=g)


@pytest.mark.parametrize("cls", [CPRDLoss, KLDistillLoss])
@pytest.mark.parametrize("shape", [(8, 7), (4, 16), (9, 8)])  # too small, same numel, larger
def test_teacher_matrix_of_another_shape_is_rejected(cls, shape):
    sim, pos, _ = _batch()
    with pytest.raises(UserError, match=rf"shape \({shape[0]}, {shape[1]}\)"):
        cls(k=4)(sim, pos, teacher=torch.randn(*shape))


def test_pair_scorer_must_return_one_score_per_pair():
    sim, pos, t = _batch()
    ref = CPRDLoss(k=4)(sim, pos, teacher=t)["distill"]
    # a [n_pairs, 1] logit column is accepted and read as [n_pairs]
    col = CPRDLoss(k=4)(sim, pos, teacher=lambda r, c: t[r, c][:, None])["distill"]
    assert col == pytest.approx(float(ref))
    with pytest.raises(UserError, match="one score per"):
        CPRDLoss(k=4)(sim, pos, teacher=lambda r, c: t[r, c][:-1])
    with pytest.raises(UserError, match="one score per"):  # same numel, wrong layout
        CPRDLoss(k=4)(sim, pos, teacher=lambda r, c: t[r, c].reshape(2, -1))
    with pytest.raises(UserError, match="pair scorer"):
        CPRDLoss(k=4)(sim, pos, teacher="not a teacher")


def _pl_nll(s):
    """Mean of logsumexp(s_j..) - s_j over j = 0..len-2 (student logits already in teacher order)."""
    terms = [math.log(sum(math.exp(v) for v in s[j:])) - s[j] for j in range(len(s) - 1)]
    return sum(terms) / len(terms), sum(terms)


def test_below_positive_drops_negatives_the_teacher_puts_above_the_positive():
    t = torch.tensor([[0.9, 0.4, 0.3, 0.2]])
    s = torch.tensor([[5.0, 1.0, 2.0, 0.5]])
    t_pos = torch.tensor([0.5])
    mean, total = _pl_nll([1.0, 2.0, 0.5])  # the 0.9 negative is invalid and ranked first: out of every term
    got = partial_ranking_nll(s, t, valid="below_positive", t_pos=t_pos)
    assert float(got) == pytest.approx(mean, rel=1e-6)
    got_sum = partial_ranking_nll(s, t, valid="below_positive", t_pos=t_pos, rank_reduction="sum")
    assert float(got_sum) == pytest.approx(total, rel=1e-6)
    # the invalid candidate's student score no longer matters; under "all" it does
    s2 = s.clone()
    s2[0, 0] = -3.0
    assert float(partial_ranking_nll(s2, t, valid="below_positive", t_pos=t_pos)) == pytest.approx(float(got))
    assert float(partial_ranking_nll(s2, t)) != pytest.approx(float(partial_ranking_nll(s, t)))
    # padded slow path agrees with the fused path
    avail = torch.tensor([[True, True, True, True]])
    pad = partial_ranking_nll(torch.cat([s, s[:, :1]], 1), torch.cat([t, t[:, :1]], 1), valid="below_positive",
                              t_pos=t_pos, available=torch.cat([avail, torch.tensor([[False]])], 1))
    assert float(pad) == pytest.approx(float(got), rel=1e-6)


def test_below_positive_is_monotone_invariant_and_needs_the_positive():
    g = torch.Generator().manual_seed(3)
    s, t, tp = torch.randn(6, 8, generator=g), torch.rand(6, 8, generator=g), torch.rand(6, generator=g)
    a = partial_ranking_nll(s, t, valid="below_positive", t_pos=tp)
    b = partial_ranking_nll(s, torch.exp(9 * t), valid="below_positive", t_pos=torch.exp(9 * tp))
    assert float(a) == pytest.approx(float(b), rel=1e-6)
    with pytest.raises(UserError, match="positive"):
        partial_ranking_nll(s, t, valid="below_positive")


def test_cprd_loss_module_and_function_agree_on_below_positive():
    sim, pos, t = _batch(10, seed=1)
    cfg = CPRDConfig(k=5, valid="below_positive", symmetric=False)
    mod = CPRDLoss(cfg)(sim, pos, teacher=t, tau=0.1)["distill"]
    fn = cprd_loss(sim, t, pos, k=5, tau=0.1, valid="below_positive")
    assert float(mod) == pytest.approx(float(fn), rel=1e-6)
    # and it differs from "all" on this batch (some negatives outrank their positive under t)
    assert float(cprd_loss(sim, t, pos, k=5, tau=0.1)) != pytest.approx(float(fn))


def test_rank_sum_is_mean_times_terms():
    sim, pos, t = _batch(8, seed=2)
    m = cprd_loss(sim, t, pos, k=5, tau=0.1)
    s = cprd_loss(sim, t, pos, k=5, tau=0.1, rank_reduction="sum")
    assert float(s) == pytest.approx(4 * float(m), rel=1e-6)
    with pytest.raises(UserError, match="rank_reduction"):
        CPRDConfig(rank_reduction="max")


def test_self_teacher_control_uses_the_students_own_scores_and_never_calls_the_teacher():
    sim, pos, _ = _batch(8, seed=4)

    def forbidden(r, c):
        raise AssertionError("a control must not call the teacher")

    own = CPRDLoss(k=4, teacher_source="self")(sim, pos, teacher=forbidden)["distill"]
    ref = CPRDLoss(k=4)(sim, pos, teacher=sim.detach())["distill"]
    assert float(own) == pytest.approx(float(ref), rel=1e-6)
    torch.manual_seed(0)
    r1 = CPRDLoss(k=4, teacher_source="random")(sim, pos, teacher=None)["distill"]
    torch.manual_seed(0)
    r2 = CPRDLoss(k=4, teacher_source="random")(sim, pos)["distill"]
    assert float(r1) == float(r2)  # reproducible under the run's seed
    assert float(r1) > float(own)  # a random order is harder to fit than the student's own order
    with pytest.raises(UserError, match="needs a teacher"):
        CPRDLoss(k=4)(sim, pos)
    with pytest.raises(UserError, match="teacher_source"):
        CPRDConfig(teacher_source="oracle")


def test_skip_mines_the_next_window_of_negatives():
    sim, pos, t = _batch(24, seed=5)
    idx, _ = mine_hard_negatives(sim, pos, 4, skip=4)
    ref = sim.masked_fill(pos, float("-inf")).topk(8, dim=1).indices[:, 4:]
    assert torch.equal(idx, ref)
    with pytest.raises(UserError, match="k \\+ skip"):
        mine_hard_negatives(sim, pos, 12, skip=12)
    easy = CPRDLoss(k=4, skip=4, symmetric=False)(sim, pos, teacher=t)["distill"]
    assert float(easy) == pytest.approx(float(cprd_loss(sim, t, pos, k=4, skip=4, tau=0.07)), rel=1e-6)


def test_margin_mse_on_raw_cosines():
    sim, pos, t = _batch(8, seed=6)
    tau = 0.05
    cos = MarginMSEDistillLoss(k=3, symmetric=False)(sim, pos, teacher=t, tau=tau)["distill"]
    logit = MarginMSEDistillLoss(k=3, symmetric=False, margin_on="logit")(sim, pos, teacher=t, tau=tau)["distill"]
    hard, _ = mine_hard_negatives(sim, pos, 3)
    cols = torch.cat([torch.arange(8)[:, None], hard], 1)

    def manual(s):
        tt = t.gather(1, cols)
        return (((s[:, :1] - s[:, 1:]) - (tt[:, :1] - tt[:, 1:])) ** 2).mean()

    assert float(cos) == pytest.approx(float(manual(sim.gather(1, cols))), rel=1e-5)
    assert float(logit) == pytest.approx(float(manual(sim.gather(1, cols) / tau)), rel=1e-5)


class _Echo(torch.nn.Module):
    def forward(self, features):
        return {"sentence_embedding": features["x"]}


def test_sentence_transformers_online_mining_ranks_the_current_students_top_k():
    g = torch.Generator().manual_seed(7)
    b, n, d = 4, 5, 6
    cols = [torch.randn(b, d, generator=g) for _ in range(n + 1 + 1)]  # query, positive, n candidates
    labels = torch.randn(b, n + 1, generator=g)
    loss = CPRDSentenceTransformerLoss(_Echo(), weight=1.0, tau=0.1, k=2)
    feats = [{"x": c} for c in cols]
    online = loss(feats, labels)
    # the same loss with each row's candidates cut to the student's own top 2, ranked in full
    q = torch.nn.functional.normalize(cols[0], dim=-1)
    cand = torch.stack([torch.nn.functional.normalize(c, dim=-1) for c in cols[2:]], 1)
    top = (q[:, None, :] * cand).sum(-1).topk(2, dim=1).indices
    nce = CPRDSentenceTransformerLoss(_Echo(), weight=0.0, tau=0.1)(feats, labels)
    own = (q[:, None, :] * cand).sum(-1).gather(1, top) / 0.1
    expect = nce + partial_ranking_nll(own, labels[:, 1:].gather(1, top))
    assert float(online) == pytest.approx(float(expect), rel=1e-5)
    with pytest.raises(UserError, match="exceeds"):
        CPRDSentenceTransformerLoss(_Echo(), k=9)(feats, labels)


def test_random_control_resumes_to_the_same_draws():
    from transferlab.cprd import DualEncoder, DualEncoderTrainer

    g = torch.Generator().manual_seed(8)
    xs = [torch.randn(12, 6, generator=g) for _ in range(4)]

    def trainer():
        torch.manual_seed(0)
        model = DualEncoder(torch.nn.Linear(6, 4), torch.nn.Linear(6, 4))
        return DualEncoderTrainer(model, CPRDLoss(k=4, teacher_source="random"), lr=1e-2)

    full = trainer()
    for x in xs:
        full.update(x, x + 0.1)
    part = trainer()
    for x in xs[:2]:
        part.update(x, x + 0.1)
    state = part.state_dict()
    resumed = trainer()
    torch.manual_seed(123)  # a resumed process's global RNG is elsewhere: it must not matter
    resumed.load_state_dict(state)
    for x in xs[2:]:
        resumed.update(x, x + 0.1)
    for a, b in zip(full.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)
    other = trainer()
    other.loss.random_base += 1  # another stream gives other orders
    for x in xs:
        other.update(x, x + 0.1)
    assert not all(torch.equal(a, b) for a, b in zip(full.model.parameters(), other.model.parameters()))


def test_notes_report_the_teachers_paired_validation_advantage(tmp_path):
    from transferlab.cprd.plots import plot_score_distributions

    rows = [{"arm": "infonce", "seed": s, "metrics": {"teacher_val_family_acc": 86.0 + s, "val_family_acc": 56.0}}
            for s in range(3)]
    notes = plot_score_distributions(rows, None, tmp_path).notes
    assert "advantage over the InfoNCE student" in notes and "31.00 ±" in notes and "over 3 seeds" in notes


def test_notes_pair_cprd_with_each_control_by_seed(tmp_path):
    from transferlab.cprd.plots import plot_score_distributions

    rows = [{"arm": arm, "seed": s, "metrics": {"RSUM": base + s + (10.0 if arm == "cprd" else 0.0)}}
            for arm, base in (("cprd", 0.0), ("cprd_self", 0.0), ("infonce", 50.0)) for s in range(4)]
    notes = plot_score_distributions(rows, None, tmp_path).notes
    assert "RSUM cprd − cprd_self: 10.00 ± 0.00 over 4 paired seeds: better" in notes
    assert "RSUM cprd − infonce: -40.00 ± 0.00 over 4 paired seeds: worse" in notes
    assert "cprd_random" not in notes  # no rows, no contrast
