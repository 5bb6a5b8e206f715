"""Benchmarks: GPM basis update (Gram + eigh vs full SVD) and the cost of projection in a training step.

`gpm-basis`: a conv-sized representation matrix (1152 x 6400, the shape of a 128-channel 3x3 conv
layer's im2col on 6400 patches) with a power-law spectrum like real activations. Candidate: our
basis update (float64 Gram + symmetric eigh); baselines: torch.linalg.svd of the same matrix in
float64 (the exact reference) and float32 (GPM's code runs its SVD on float32 activations).
The retained subspaces are compared by their largest principal angle.

`gpm-step`: one SGD step of GPM's PMNIST MLP (784-100-100-10, no bias) at batch 64, with the bases
GPM builds while training on 2 / 5 / 9 permuted Fashion-MNIST tasks, against the same step without
projection. Candidates: the first layer's inputs projected once per task (`GPMConfig.input_cache`),
per step amortising the one-off projection over a PMNIST task (54k inputs, 5 epochs); the per-step
input-side projection; and the official code's dense m x m projector g - g M M^T.
Per step, an exact projection costs >= m * min(r, m - r) multiply-adds per sample in layer 1;
only the cache, which moves that cost out of the step, can approach plain SGD.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..core.bench import Comparison, time_fn, time_pair
from ..core.registry import register_benchmark
from .memory import grow_basis, principal_angle_max


def conv_like_matrix(m: int = 1152, n: int = 6400, seed: int = 0, device="cpu") -> torch.Tensor:
    """m x n float32 with singular values ~ i^-1 (im2col matrices of trained convs decay similarly)."""
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(m, m, generator=g))[0]
    s = 1.0 / torch.arange(1, m + 1, dtype=torch.float32)
    V = torch.randn(m, n, generator=g) / n**0.5
    return ((U * s) @ V).to(device)


@register_benchmark("gpm-basis", "GPM basis update on a 1152x6400 conv representation: Gram+eigh vs full SVD")
def bench_basis(device: str = "cpu") -> list[Comparison]:
    A = conv_like_matrix(device=device)
    eps = 0.97
    M_eigh, r = grow_basis(None, A, eps, "eigh")
    t_eigh = time_fn(lambda: grow_basis(None, A, eps, "eigh"), warmup=1, repeat=3, device=device)
    M_svd, r_svd = grow_basis(None, A, eps, "svd")  # float64 SVD: the exact reference subspace
    t_svd64 = time_fn(lambda: torch.linalg.svd(A.double(), full_matrices=False), warmup=0, repeat=1, device=device)
    t_svd32 = time_fn(lambda: torch.linalg.svd(A, full_matrices=False), warmup=0, repeat=1, device=device)
    U32 = torch.linalg.svd(A, full_matrices=False)[0][:, :r].double()
    angle = principal_angle_max(M_eigh, M_svd) if r == r_svd else float("inf")
    angle32 = principal_angle_max(M_eigh, U32)
    return [
        Comparison("gpm-basis", "gram+eigh (f64)", "torch.linalg.svd (f64)", t_eigh, t_svd64, 10.0, "speedup",
                   note=f"r={r} (svd r={r_svd}) of 1152 at eps={eps}"),
        Comparison("gpm-basis", "gram+eigh (f64)", "torch.linalg.svd (f32)", t_eigh, t_svd32, None, "speedup"),
        Comparison("gpm-basis-angle", "max principal angle vs f64 SVD", "", angle, None, 1e-3, "max", unit="rad"),
        Comparison("gpm-basis-angle-f32", "max principal angle vs f32 SVD", "", angle32, None, None, "max",
                   unit="rad"),
    ]


def _pmnist_snapshots(at=(2, 5, 9), n_train: int = 2000, seed: int = 0) -> tuple[dict, list]:
    """GPM bases after training on `at` permuted Fashion-MNIST tasks (real images, trained MLP).

    The MLP is trained with GPM (1 epoch per task, batch 64, lr 0.05) so the bases are the ones
    training produces, not those of random or untrained features. Returns ({n_tasks: bases}, tasks).
    """
    from ..nn import MLP
    from .config import GPMConfig
    from .strategies import GPM
    from .streams import permuted_stream
    from .train import train_task

    torch.manual_seed(seed)
    model = MLP(784, (100, 100), 10, bias=False)
    strat = GPM(model, GPMConfig())
    tasks = permuted_stream(max(at), n_train=n_train, n_test=10, seed=seed)
    snaps = {}
    for t, task in enumerate(tasks):
        train_task(model, strat, task, t, lr=0.05, epochs=1, batch_size=64, seed=seed)
        if t + 1 in at:
            snaps[t + 1] = {k: v.clone() for k, v in strat.memory.bases.items()}
    strat.detach()
    return snaps, tasks


def _step_comparisons(n_tasks: int, bases: dict, tasks, device: str, epochs: int = 5,
                      n_task_train: int = 54000) -> list[Comparison]:
    from ..nn import MLP
    from .config import GPMConfig
    from .strategies import GPM

    torch.manual_seed(0)
    model = MLP(784, (100, 100), 10, bias=False).to(device)
    strat = GPM(model, GPMConfig(input_cache=True))
    strat.memory.bases = {k: v.to(device) for k, v in bases.items()}
    strat.memory._factors = {}
    task = tasks[n_tasks % len(tasks)]
    X = task.transform(task.x_train).to(device)
    y = task.y_train.to(device)
    strat.before_task(n_tasks, [(X[:1], y[:1])])
    XP = strat.project_inputs(X)
    dense = {n: bases[n].to(device) @ bases[n].to(device).T for n in strat.memory.names}  # official projector
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(1)
    idx = [torch.randint(0, len(X), (64,), generator=g).to(device) for _ in range(20)]

    def run(mode: str):
        def steps():  # 20 steps per timing sample so timer noise is small
            strat._set_projection()
            if mode in ("plain", "dense"):
                for p in strat.patches.values():
                    p.factor = None
            for b in idx:
                if mode == "cached":
                    strat.feed_projected(XP.index_select(0, b))
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(model(X.index_select(0, b)), y[b]).backward()
                if mode == "dense":  # GPM's code: g <- g - g (M M^T), dense m x m per layer
                    for n, P in dense.items():
                        w = strat.memory.modules[n].weight
                        w.grad.sub_(w.grad @ P)
                elif mode != "plain":
                    strat.after_backward(model)
                opt.step()
        return steps

    kw = dict(rounds=3, warmup=1, repeat=5, device=device, clock="auto")
    t_c, t_p = time_pair(run("cached"), run("plain"), **kw)
    t_in, t_p2 = time_pair(run("input"), run("plain"), **kw)
    t_d, t_p3 = time_pair(run("dense"), run("plain"), **kw)
    once = time_fn(lambda: strat.project_inputs(X), warmup=1, repeat=3, device=device, clock="auto")
    once *= n_task_train / len(X)
    steps_per_task = epochs * -(-n_task_train // 64)
    amortised = t_c + once * 20 / steps_per_task  # per 20 steps, the one-off projection spread over the task
    strat.detach()
    r = "/".join(str(b.shape[1]) for b in bases.values())
    label = f"gpm-step ({n_tasks} tasks, r={r})"
    note = "20 steps, batch 64, real bases"
    return [
        Comparison(label, "GPM cached projected inputs", "plain SGD", t_c, t_p, 1.2, "ratio", note=note),
        Comparison(label + " amortised", "cached + one-off projection", "plain SGD", amortised, t_p, 1.2, "ratio",
                   note=f"one-off {once:.2f}s for {n_task_train} inputs over {steps_per_task} steps "
                        f"({epochs} epochs)"),
        Comparison(label, "GPM input-side projection (per step)", "plain SGD", t_in, t_p2, None, "ratio"),
        Comparison(label, "official dense m x m projector", "plain SGD", t_d, t_p3, None, "ratio"),
        Comparison(label, "GPM cached projected inputs", "official dense m x m projector", t_c, t_d * t_p / t_p3,
                   None, "speedup"),
    ]


@register_benchmark("gpm-step", "PMNIST MLP SGD step at batch 64: GPM projection overhead vs plain SGD "
                                "(cached first-layer projection, per-step input-side, official dense projector)")
def bench_step(device: str = "cpu") -> list[Comparison]:
    snaps, tasks = _pmnist_snapshots()
    return [c for n_tasks in (2, 5, 9) for c in _step_comparisons(n_tasks, snaps[n_tasks], tasks, device)]
