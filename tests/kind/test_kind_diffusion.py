"""DiT shapes, DDPM/DDIM correctness, resumable training, and the generative metrics."""

import pytest
import torch

from transferlab.core.engine import Engine
from transferlab.kind.metrics import frechet_distance, knn_precision_recall
from transferlab.nn.diffusion import Diffusion, train_diffusion
from transferlab.nn.dit import DiT


def test_dit_patchify_round_trip_and_adaln_zero_start():
    m = DiT(image_size=28, patch=7, width=32, depth=2, heads=2, num_classes=4)
    x = torch.randn(3, 1, 28, 28)
    assert torch.equal(m.unpatchify(m.patchify(x)), x)
    out = m(x, torch.tensor([1, 2, 3]), torch.tensor([0, 1, 4]))  # 4 = null label
    assert out.shape == x.shape and torch.equal(out, torch.zeros_like(out))  # adaLN-Zero: output starts at 0


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_ddim_with_the_exact_noise_predictor_recovers_a_point_mass(schedule):
    """For data = one image x*, eps(x_t) = (x_t - sqrt(abar) x*) / sqrt(1 - abar) is optimal; DDIM must land on x*."""
    diff = Diffusion(200, schedule)
    target = torch.rand(1, 1, 4, 4) * 1.6 - 0.8

    def oracle(x, t, y):
        a = diff.alpha_bar[t].view(-1, 1, 1, 1)
        return (x - a.sqrt() * target) / (1 - a).sqrt()

    out = diff.ddim_sample(oracle, torch.zeros(3, dtype=torch.long), (1, 4, 4), steps=10,
                           generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, target.expand(3, -1, -1, -1), atol=1e-4, rtol=0)
    # guidance with identical cond/uncond predictions changes nothing
    out2 = diff.ddim_sample(oracle, torch.zeros(3, dtype=torch.long), (1, 4, 4), steps=10, cfg_scale=3.0,
                            null_label=1, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out2, out)


def test_q_sample_keeps_unit_variance():
    diff = Diffusion(1000)
    x0 = torch.randn(20000, 1, 1, 1)
    xt = diff.q_sample(x0, torch.full((20000,), 500), torch.randn_like(x0))
    assert abs(xt.var().item() - 1) < 0.05


def _tiny():
    torch.manual_seed(0)
    return DiT(image_size=8, patch=4, width=16, depth=1, heads=2, num_classes=2)


def test_killed_training_resumes_to_the_same_weights(tmp_path):
    x, y = torch.randn(40, 1, 8, 8), torch.randint(0, 2, (40,))
    diff = Diffusion(100)
    engine = Engine("cpu", threads=1)

    def run(run_dir, crash_at=None):
        engine.run_dir = run_dir
        engine.seed(0)
        m = _tiny()
        opt = torch.optim.Adam(m.parameters(), lr=1e-2)
        if crash_at is not None:
            orig, calls = opt.step, []

            def step(*a, **k):
                calls.append(1)
                if len(calls) == crash_at:
                    raise KeyboardInterrupt
                return orig(*a, **k)

            opt.step = step
        train_diffusion(m, diff, x, y, steps=9, batch_size=16, optimizer=opt, seed=3, engine=engine,
                        class_dropout=0.2, null_label=2, checkpoint_every=4)
        return m

    straight = run(tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", crash_at=7)
    assert (tmp_path / "b" / "checkpoint.pt").exists()
    engine.run_dir = tmp_path / "b"  # the runner re-seeds, then training resumes from step 4
    resumed = run(tmp_path / "b")
    for p, q in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


def test_frechet_distance_is_zero_for_identical_sets_and_mean_shift_for_shifted_ones():
    f = torch.randn(500, 6, dtype=torch.float64)
    assert abs(frechet_distance(f, f)) < 1e-8
    shift = torch.tensor([1.0, 2.0, 0, 0, 0, 0], dtype=torch.float64)
    assert frechet_distance(f, f + shift) == pytest.approx(5.0, abs=1e-6)
    # a covariance change is seen too: N(0, I) vs N(0, 4I) in 6-D gives 6 * (1 + 4 - 2*2) = 6
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(20000, 6, generator=g), 2 * torch.randn(20000, 6, generator=g)
    assert frechet_distance(a, b) == pytest.approx(6.0, rel=0.05)
    with pytest.raises(ValueError):
        frechet_distance(f, f[:, :3])


def test_knn_precision_recall_extremes():
    real = torch.randn(200, 4)
    p, r = knn_precision_recall(real, real.clone(), k=3)
    assert p == 1.0 and r == 1.0
    p, r = knn_precision_recall(real, real + 100, k=3)
    assert p == 0.0 and r == 0.0
    # mode collapse: all fakes on one real point -> high precision, low recall
    collapsed = real[:1].repeat(200, 1) + 1e-3 * torch.randn(200, 4)
    p, r = knn_precision_recall(real, collapsed, k=3)
    assert p == 1.0 and r < 0.1
