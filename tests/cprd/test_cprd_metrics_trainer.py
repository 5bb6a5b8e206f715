"""Retrieval metrics on hand-worked rankings; baselines; trainer; sentence-transformers adapter."""

import pytest
import torch

from transferlab.core.errors import UserError
from transferlab.cprd import (
    CPRDConfig,
    CPRDLoss,
    CPRDSentenceTransformerLoss,
    DualEncoder,
    DualEncoderTrainer,
    InfoNCELoss,
    KLDistillLoss,
    ListNetDistillLoss,
    MarginMSEDistillLoss,
    kl_distill_loss,
    margin_mse_loss,
    retrieval_metrics,
)
from transferlab.cprd.common import rank_corr


def test_metrics_hand_worked_rankings():
    # 3 images, 6 texts; text j belongs to image j // 2 (two captions per image)
    t2i = torch.tensor([0, 0, 1, 1, 2, 2])
    sim = torch.tensor([
        # texts:  0    1    2    3    4    5
        [0.10, 0.90, 0.95, 0.20, 0.30, 0.40],  # image 0: best own caption (1) at rank 2 -> miss @1, hit @5
        [0.50, 0.10, 0.20, 0.30, 0.60, 0.70],  # image 1: own captions 2,3 at ranks 5/6 -> best rank 5 (1-based)
        [0.00, 0.10, 0.20, 0.30, 0.99, 0.40],  # image 2: own caption 4 at rank 1 -> hit @1
    ])
    m = retrieval_metrics(sim, t2i)
    assert m["i2t_R@1"] == pytest.approx(100 / 3)
    assert m["i2t_R@5"] == pytest.approx(100.0)  # image 1's best own caption is 5th: a hit at 5
    # text->image: column argmax ranks. text0: images (0.10, 0.50, 0.00) -> own image 0 at rank 2
    # text1: (0.90, .10, .10) rank 1; text2: (.95, .20, .20) own image 1 at rank 2; text3: (.2,.3,.3) tie
    # with image 2 -> ties count against: rank 2; text4: (.3,.6,.99) rank 1; text5: (.4,.7,.4) own 2 -> rank 2
    assert m["t2i_R@1"] == pytest.approx(100 * 2 / 6)
    assert m["t2i_R@5"] == pytest.approx(100.0)
    assert m["RSUM"] == pytest.approx(sum(v for k, v in m.items() if k != "RSUM"))


def test_metrics_is_hit_rate_not_trec_recall():
    # one image with 5 captions, the first ranked 1st: hit rate @1 = 100 % (TREC recall@1 would be 20 %)
    sim = torch.tensor([[0.9, 0.1, 0.1, 0.1, 0.1, 0.5], [0.0, 0.0, 0.0, 0.0, 0.0, 0.6]])
    m = retrieval_metrics(sim, torch.tensor([0, 0, 0, 0, 0, 1]))
    assert m["i2t_R@1"] == 100.0


def test_metrics_bad_input():
    with pytest.raises(UserError, match="one entry per text"):
        retrieval_metrics(torch.randn(2, 3), torch.tensor([0, 1]))
    with pytest.raises(UserError, match="outside"):
        retrieval_metrics(torch.randn(2, 3), torch.tensor([0, 1, 2]))


def test_kl_baseline_is_weak_with_concentrated_teacher():
    # spec Sec. 7: KL on concentrated teacher scores barely separates ordered from reversed students
    t = torch.cat([torch.tensor([0.03]), torch.linspace(0.02, 0.0, 8)])[None]  # positive first
    s = torch.cat([torch.tensor([0.8]), torch.linspace(0.6, 0.4, 8)])[None]
    s_rev = torch.cat([torch.tensor([0.8]), torch.linspace(0.4, 0.6, 8)])[None]
    kl_o, kl_r = kl_distill_loss(s / 0.05, t), kl_distill_loss(s_rev / 0.05, t)
    assert abs(kl_r - kl_o) < 0.05  # nearly indistinguishable
    assert margin_mse_loss(s, t).item() == pytest.approx(((s[:, :1] - s[:, 1:] - (t[:, :1] - t[:, 1:])) ** 2)
                                                        .mean().item())


@pytest.mark.parametrize("cls", [InfoNCELoss, CPRDLoss, KLDistillLoss, MarginMSEDistillLoss, ListNetDistillLoss])
def test_objectives_run_and_backprop(cls):
    torch.manual_seed(0)
    sim = torch.nn.functional.normalize(torch.randn(8, 4), dim=1) @ torch.nn.functional.normalize(
        torch.randn(8, 4), dim=1).t()
    sim.requires_grad_()
    out = cls(CPRDConfig(k=3))(sim, torch.eye(8, dtype=torch.bool), torch.randn(8, 8), tau=0.1)
    out["loss"].backward()
    assert torch.isfinite(sim.grad).all()
    assert (out["distill"].item() == 0.0) == (cls is InfoNCELoss)


class Teacher(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Linear(4, 4)

    def forward(self, images, texts, rows, cols):
        return (self.w(images[rows]) * texts[cols]).sum(-1)


def test_trainer_learns_and_never_updates_teacher():
    torch.manual_seed(0)
    x = torch.randn(64, 4)
    y = x @ torch.randn(4, 4) + 0.05 * torch.randn(64, 4)  # paired "texts"
    model = DualEncoder(torch.nn.Linear(4, 8), torch.nn.Linear(4, 8))
    teacher = Teacher()
    before = [p.clone() for p in teacher.parameters()]
    trainer = DualEncoderTrainer(model, CPRDLoss(k=4, weight=1.0), teacher=teacher, lr=1e-2, warmup_steps=5)
    first = retrieval_metrics(trainer.similarity(x, y), torch.arange(64))["RSUM"]
    for _ in range(60):
        b = torch.randperm(64)[:16]
        out = trainer.update(x[b], y[b])
    assert out["distill"] > 0 and out["tau"] > 0
    last = retrieval_metrics(trainer.similarity(x, y), torch.arange(64))["RSUM"]
    assert last > first + 50
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, teacher.parameters()))
    state = trainer.state_dict()
    trainer2 = DualEncoderTrainer(DualEncoder(torch.nn.Linear(4, 8), torch.nn.Linear(4, 8)), CPRDLoss(k=4))
    trainer2.load_state_dict(state)
    assert torch.allclose(trainer2.similarity(x, y), trainer.similarity(x, y))


def test_trainer_errors():
    model = DualEncoder(torch.nn.Linear(4, 8), torch.nn.Linear(4, 8))
    with pytest.raises(UserError, match="teacher"):
        DualEncoderTrainer(model, CPRDLoss(k=2)).update(torch.randn(6, 4), torch.randn(6, 4))
    with pytest.raises(UserError, match="positive_mask"):
        DualEncoderTrainer(model).update(torch.randn(6, 4), torch.randn(5, 4))


class FakeST(torch.nn.Module):
    """Stands in for a SentenceTransformer: features {"x": tensor} -> {"sentence_embedding": ...}."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(5, 6)

    def forward(self, features):
        return {"sentence_embedding": self.lin(features["x"])}


def test_sentence_transformers_adapter():
    torch.manual_seed(0)
    model = FakeST()
    loss = CPRDSentenceTransformerLoss(model, weight=1.0, tau=0.05)
    cols = [{"x": torch.randn(4, 5)} for _ in range(5)]  # query, positive, 3 negatives
    labels = torch.randn(4, 4)
    value = loss(cols, labels)
    value.backward()
    assert torch.isfinite(value) and model.lin.weight.grad is not None
    # the CPRD part depends on the teacher only through the order of the negatives
    assert loss(cols, labels.exp()).item() == pytest.approx(loss(cols, labels).item(), rel=1e-5)
    with pytest.raises(UserError, match="labels"):
        loss(cols, torch.randn(4, 3))
    with pytest.raises(UserError, match="columns"):
        loss(cols[:2], torch.randn(4, 1))


def test_rank_corr():
    a = torch.arange(10.0)
    assert rank_corr(a, a**3) == pytest.approx(1.0)
    assert rank_corr(a, -a) == pytest.approx(-1.0)


@pytest.mark.slow
def test_sentence_transformers_adapter_with_minilm():
    st = pytest.importorskip("sentence_transformers")
    from transferlab.data import minilm_path

    model = st.SentenceTransformer(str(minilm_path()), device="cpu")
    loss = CPRDSentenceTransformerLoss(model)
    texts = [["a dog barks", "a cat sleeps"], ["an animal makes a noise", "a pet rests"], ["a car", "a tree"],
             ["stock prices", "a song"]]
    feats = [model.tokenize(t) for t in texts]
    value = loss(feats, torch.tensor([[5.0, 1.0, 0.0], [4.0, 0.5, 0.2]]))
    value.backward()
    assert torch.isfinite(value)
