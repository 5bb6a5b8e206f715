"""Stage order, the train/eval-mode and expert-BN options, the meta-training curve and the diagnostics."""

import copy

import pytest
import torch
import torch.nn.functional as F

from transferlab.core.errors import UserError
from transferlab.metadmoe import MetaDMoE, MetaDMoEConfig
from transferlab.metadmoe.diagnostics import ensemble_accuracy, expert_matrix, feature_mse, teacher_accuracy

from .helpers import TinyNet, batch, make, same_state, state


def _domains(k=3, n=48):
    return [batch(n, seed=10 + d) for d in range(k)]


def test_train_experts_before_pretrain_student_refuses_and_changes_nothing():
    m = make(expert_epochs=1, student_epochs=1)
    before = state(m)
    with pytest.raises(UserError, match="call pretrain_student"):
        m.train_experts(_domains())
    assert same_state(before, state(m))  # no expert was overwritten with the untrained student
    m.pretrain_student(_domains())
    m.train_experts(_domains())  # now allowed
    restored = make(expert_epochs=1)
    restored.load_state_dict(m.state_dict())  # the flag travels with the weights
    restored.train_experts(_domains())


def test_a_student_trained_elsewhere_or_scratch_experts_may_skip_pretraining():
    m = make(expert_epochs=1)
    MetaDMoE(list(m.experts), m.aggregator, m.student, m.config, input_shape=(6,),
             student_pretrained=True).train_experts(_domains())
    make(expert_epochs=1, expert_init="scratch").train_experts(_domains())


def test_eval_mode_meta_training_leaves_bn_statistics_unchanged_and_train_mode_updates_them():
    for mode in ("eval", "train"):
        m = make(train_mode=mode, meta_epochs=2, episodes_per_epoch=3, support_size=8, query_size=8)
        bufs = {k: v.clone() for k, v in m.student.named_buffers()}
        m.meta_train(_domains())
        same = all(torch.equal(v, bufs[k]) for k, v in m.student.named_buffers())
        assert same == (mode == "eval"), mode


def test_train_mode_adapt_uses_batch_statistics_without_touching_stored_buffers():
    m = make(train_mode="train", inner_lr=0.2)
    before = state(m)
    x, _ = batch(16, seed=3)
    adapted = m.adapt(x)
    assert same_state(before, state(m))
    ref = copy.deepcopy(m.student).train()  # a train-mode forward with the adapted weights on a copy
    ref.load_state_dict({**m.student.state_dict(), **adapted.params})
    torch.testing.assert_close(adapted.predict(x), ref(x), atol=1e-12, rtol=0)
    eval_adapted = make(inner_lr=0.2).adapt(x)
    assert not torch.allclose(eval_adapted.predict(x), adapted.predict(x))


def test_expert_batch_statistics_option_matches_train_mode_experts_and_keeps_their_buffers():
    m = make(expert_bn="batch")
    before = state(m)
    x, _ = batch(16, seed=3)
    t = m.teacher(x, bn="batch")
    assert same_state(before, state(m))
    copies = [copy.deepcopy(e).train() for e in m.experts]
    m.aggregator.eval()
    ref = m.aggregator.features(torch.stack([e.features(x) for e in copies], 1))
    torch.testing.assert_close(t, ref, atol=1e-12, rtol=0)
    assert not torch.allclose(t, m.teacher(x))  # eval-mode experts give another teacher
    assert not torch.allclose(m.adapt(x).params["body.0.weight"], make().adapt(x).params["body.0.weight"])
    with pytest.raises(UserError, match="'eval' or 'batch'"):
        MetaDMoEConfig(expert_bn="train")


def test_meta_training_curve_has_one_point_per_block_of_episodes():
    m = make(meta_epochs=2, episodes_per_epoch=5, log_every=2, support_size=8, query_size=8)
    m.meta_train(_domains())
    assert [c["episode"] for c in m.curve] == [2, 4, 5, 7, 9, 10]
    assert all({"loss_before", "loss_after", "inner_mse"} <= set(c) for c in m.curve)
    assert len(m.history) == 2


def _student_is_teacher():
    """One expert that is an exact copy of the student, averaged: the teacher is the student itself."""
    torch.manual_seed(0)
    s = TinyNet().double()
    s.body[1].running_mean.normal_()
    return MetaDMoE([copy.deepcopy(s)], None, s, MetaDMoEConfig(teacher="average", inner_lr=0.5), input_shape=(6,))


def test_teacher_equal_to_student_gives_zero_mse_and_no_change_from_the_step():
    m = _student_is_teacher()
    x, _ = batch(16, seed=5)
    adapted = m.adapt(x)
    d = feature_mse(m, x, adapted)
    assert d == {"before": 0.0, "after": 0.0}
    for n, p in m.student.named_parameters():
        assert torch.equal(adapted.params[n], p.detach()), n


def test_feature_mse_is_the_inner_loss_and_the_step_lowers_it():
    m = make(inner_lr=0.05)
    x, _ = batch(32, seed=5)
    m.student.eval()
    hand = F.mse_loss(m.student.features(x), m.teacher(x)).item()
    d = feature_mse(m, x, m.adapt(x))
    assert d["before"] == pytest.approx(hand, abs=1e-12)
    assert d["after"] < d["before"]
    excl = feature_mse(m, x, exclude=0)
    assert set(excl) == {"before"} and excl["before"] != pytest.approx(d["before"])


def _biased_experts(k=3):
    """Expert j always predicts class j (huge head bias), so its accuracy on a domain labelled c is [j == c]."""
    m = make(n_experts=k)
    with torch.no_grad():
        for j, e in enumerate(m.experts):
            e.classifier.weight.zero_()
            e.classifier.bias.copy_(torch.eye(3, dtype=torch.float64)[j] * 100)
    return m


def test_expert_matrix_and_ensemble_on_a_hand_built_case():
    m = _biased_experts()
    doms = [(batch(10, seed=c)[0], torch.full((10,), c)) for c in range(3)]
    assert expert_matrix(m, doms) == [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    with torch.no_grad():
        m.experts[2].classifier.bias.mul_(2)  # expert 2 now dominates the averaged logits
    assert ensemble_accuracy(m, *doms[2]) == 1.0 and ensemble_accuracy(m, *doms[0]) == 0.0


def test_teacher_accuracy_reads_the_teacher_feature_through_the_chosen_head():
    m = make()
    x, _ = batch(20, seed=7)
    m.student.eval()
    m.aggregator.eval()
    with torch.no_grad():
        t = m.teacher(x)
        y_student = m.student.head(t).argmax(-1)
        y_agg = m.aggregator.classifier(t).argmax(-1)
    assert teacher_accuracy(m, x, y_student, head="student") == 1.0
    assert teacher_accuracy(m, x, y_agg, head="aggregator") == 1.0
    assert teacher_accuracy(m, x, (y_agg + 1) % 3, head="aggregator") == 0.0
    with pytest.raises(UserError, match="head='student'"):
        teacher_accuracy(make(teacher="average"), x, y_agg, head="aggregator")


def test_per_domain_protocol_adapts_once_on_the_first_batch_and_per_batch_adapts_each():
    from transferlab.metadmoe.protocol import chunks, metadmoe_accuracy

    m = make(inner_lr=0.3)
    x, _ = batch(40, seed=8)
    a0 = m.adapt(x[:16])
    y = a0.predict(x).argmax(-1)  # labels = what the once-adapted student predicts on the whole domain
    acc, mse = metadmoe_accuracy(m, x, y, 16, "per_domain")
    assert acc == 1.0 and mse == feature_mse(m, x[:16], a0)
    y_batch = torch.cat([m.adapt(x[b]).predict(x[b]).argmax(-1) for b in chunks(40, 16)])
    assert metadmoe_accuracy(m, x, y_batch, 16, "per_batch")[0] == 1.0
    seen = []  # which batches each protocol adapts to
    real = m.adapt
    m.adapt = lambda xb, **kw: (seen.append(xb.clone()), real(xb, **kw))[1]
    metadmoe_accuracy(m, x, y, 16, "per_domain")
    assert len(seen) == 1 and torch.equal(seen[0], x[:16])
    seen.clear()
    metadmoe_accuracy(m, x, y, 16, "per_batch")
    assert [len(s) for s in seen] == [16, 16, 8] and torch.equal(torch.cat(seen), x)
    assert [len(b) for b in chunks(33, 16)] == [16, 17]  # a one-image last batch joins the one before
    with pytest.raises(UserError, match="per_domain"):
        metadmoe_accuracy(m, x, y, 16, "online")


def test_online_tent_keeps_adapting_across_a_domain_and_starts_fresh_for_the_next():
    from transferlab.metadmoe import Tent
    from transferlab.metadmoe.protocol import tent_accuracy

    torch.manual_seed(0)
    net = TinyNet().double().eval()
    x, _ = batch(48, seed=9)
    ref = Tent(net, lr=0.3, episodic=False)  # by hand: one Tent kept across the three batches
    preds = []
    for b in torch.arange(48).split(16):
        ref.update(x[b])
        preds.append(ref.predict(x[b]).argmax(-1))
    y = torch.cat(preds)
    assert tent_accuracy(net, x, y, 16, 0.3, "online") == 1.0
    assert tent_accuracy(net, x, y, 16, 0.3, "online") == 1.0  # a second domain starts from the source again
    epi = torch.cat([(lambda t: (t.update(x[b]), t.predict(x[b]))[1])(Tent(net, lr=0.3)).argmax(-1)
                     for b in torch.arange(48).split(16)])
    assert tent_accuracy(net, x, epi, 16, 0.3, "episodic") == 1.0
    assert not torch.equal(y, epi)


def test_early_stopping_keeps_the_best_validation_epoch():
    m = make(student_epochs=6, patience=1, student_lr=0.05)
    train = _domains(2, 48)
    x, y = batch(40, seed=30)
    val = [(x, (y + 1) % 3)]  # labels unrelated to training: validation accuracy peaks early
    m.pretrain_student(train, val=val)
    log = m.fit_log["student"]
    assert log["epochs"] == log["best_epoch"] + 1 < 6 or log["epochs"] == 6
    from transferlab.metadmoe.model import _val_accuracy
    assert _val_accuracy(m.student, val, "cpu") == pytest.approx(log["val_acc"])  # best weights restored
    fixed = make(student_epochs=2)
    fixed.pretrain_student(train, val=val)
    assert fixed.fit_log["student"]["epochs"] == 2 == fixed.fit_log["student"]["best_epoch"]


def test_a_state_dict_without_the_trained_flag_still_loads():
    m = make()
    sd = {k: v for k, v in m.state_dict().items() if k != "student_ready"}
    fresh = make()
    fresh.load_state_dict(sd)  # strict: no missing-key error
    assert not bool(fresh.student_ready)
    with pytest.raises(UserError, match="student_pretrained=True"):
        fresh.train_experts(_domains())


def test_specialisation_gap_compares_each_expert_with_the_others_on_its_own_domain():
    from transferlab.metadmoe.plots import _specialisation

    # fold 0 held out; experts of domains 1 and 2; columns are the six domains
    mat = [[0, 90, 60, 0, 0, 0], [0, 70, 80, 0, 0, 0]]
    rows = [{"arm": "erm", "seed": 0, "metrics": {"expert_matrix_d0": mat, "expert_domains_d0": [1, 2]}},
            {"arm": "tent", "seed": 0, "metrics": {"expert_matrix_d0": mat, "expert_domains_d0": [2, 1]}}]
    assert _specialisation(rows, [0]) == [(90 - 70 + 80 - 60) / 2]  # erm rows only
    same = [[0, 80, 80, 0, 0, 0], [0, 80, 80, 0, 0, 0]]  # experts that equal each other do not specialise
    assert _specialisation([{"arm": "erm", "seed": 1, "metrics": {"expert_matrix_d0": same,
                                                                  "expert_domains_d0": [1, 2]}}], [0]) == [0.0]
