"""The cprd-wordnet teacher: BERT layer port, zero-shot start, padding, best-on-validation fine-tuning."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from transferlab.cprd.wordnet_teacher import BertPairLayer, MiniLMCrossEncoder, fine_tune_teacher, rerank_r1

D, L = 32, 6


def _tiny_teacher(seed=0):
    torch.manual_seed(seed)
    return MiniLMCrossEncoder(nn.ModuleList([BertPairLayer(D, 4, 64, 1e-12)]), d=D)


def _enc(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    states = torch.randn(n, L, D, generator=g).half()
    masks = torch.ones(n, L, dtype=torch.bool)
    masks[::3, 4:] = False  # some padded texts
    return states, masks, F.normalize(torch.randn(n, D, generator=g), dim=-1)


def test_pair_layer_equals_hugging_face_bert_layer():
    transformers = pytest.importorskip("transformers")
    from transformers.models.bert.modeling_bert import BertLayer

    cfg = transformers.BertConfig(hidden_size=D, num_attention_heads=4, intermediate_size=64,
                                  attn_implementation="eager", hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    theirs = BertLayer(cfg).eval()
    mine = BertPairLayer.from_hf(theirs, 4, cfg.layer_norm_eps)
    x = torch.randn(3, 7, D)
    keep = torch.ones(3, 7, dtype=torch.bool)
    keep[1, 5:] = False
    additive = torch.zeros(3, 1, 1, 7)
    additive[1, ..., 5:] = torch.finfo(torch.float32).min
    ref = theirs(x, attention_mask=additive)
    ref = ref[0] if isinstance(ref, tuple) else ref  # older transformers return a tuple
    torch.testing.assert_close(mine(x, keep), ref, atol=1e-5, rtol=1e-5)


def test_teacher_starts_as_zero_shot_itc_score():
    teacher, (st, mk, em) = _tiny_teacher(), _enc()
    q, g = torch.arange(10), torch.arange(10, 20)
    score = teacher(st[q], mk[q], em[q], st[g], mk[g], em[g])
    torch.testing.assert_close(score, 20.0 * (em[q] * em[g]).sum(-1))


def test_padding_tokens_do_not_change_the_score():
    teacher, (st, mk, em) = _tiny_teacher(), _enc()
    with torch.no_grad():
        teacher.head[-1].weight.normal_()  # make the joint path matter
    q, g = torch.tensor([0, 3]), torch.tensor([6, 9])  # all four texts are padded after token 4
    st2 = st.clone()
    st2[:, 4:] = torch.randn_like(st2[:, 4:].float()).half()
    a = teacher(st[q], mk[q], em[q], st[g], mk[g], em[g])
    b = teacher(st2[q], mk[q], em[q], st2[g], mk[g], em[g])
    torch.testing.assert_close(a, b)
    st2[0, :4] += 1.0  # a real token does matter
    assert not torch.allclose(a, teacher(st2[q], mk[q], em[q], st2[g], mk[g], em[g]))


def test_fine_tuning_keeps_the_best_validation_checkpoint():
    enc = _enc(n=60)
    train_q, train_g = torch.arange(0, 20), torch.arange(20, 40)
    val_q = torch.arange(40, 50)
    cand = torch.stack([torch.arange(50, 60).roll(i) for i in range(10)])  # [10, 10]
    hit = cand == (val_q + 10)[:, None]
    teacher, report = fine_tune_teacher(_tiny_teacher(), enc, train_q, train_g, (val_q, cand, hit), steps=6,
                                        queries=4, negatives=3, pool=5, lr=1e-2, encoder_lr=1e-3,
                                        eval_every=2, seed=0)
    steps = [s for s, _ in report["teacher_val_history"]]
    assert steps == [0, 2, 4, 6]
    assert report["teacher_val_R@1"] == max(r for _, r in report["teacher_val_history"])
    assert report["teacher_val_R@1"] >= report["teacher_val_R@1_zero_shot"]
    assert rerank_r1(teacher, enc, val_q, cand, hit) == pytest.approx(report["teacher_val_R@1"])


def test_fine_tuning_rejects_a_pool_larger_than_the_glosses():
    from transferlab.core.errors import UserError

    enc = _enc(n=30)
    with pytest.raises(UserError, match="pool"):
        fine_tune_teacher(_tiny_teacher(), enc, torch.arange(5), torch.arange(5, 10),
                          (torch.arange(10, 12), torch.zeros(2, 3, dtype=torch.long),
                           torch.zeros(2, 3, dtype=torch.bool)),
                          steps=1, queries=2, negatives=2, pool=8, lr=1e-3, encoder_lr=1e-3, eval_every=1, seed=0)
