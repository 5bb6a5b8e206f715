"""Benchmarks: GPM basis update (Gram + eigh vs full SVD) and the cost of projection in a training step.

`gpm-basis`: a conv-sized representation matrix (1152 x 6400, the shape of a 128-channel 3x3 conv
layer's im2col on 6400 patches) with a power-law spectrum like real activations. Candidate: our
basis update (float64 Gram + symmetric eigh); baselines: torch.linalg.svd of the same matrix in
float64 (the exact reference) and float32 (GPM's code runs its SVD on float32 activations).
The retained subspaces are compared by their largest principal angle.

`gpm-step`: one SGD step of GPM's PMNIST MLP (784-100-100-10, no bias) at batch 64, with bases of
the sizes GPM reaches on permuted Fashion-MNIST, against the same step without projection.
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


def _pmnist_bases(n_tasks: int = 5, seed: int = 0):
    """Bases GPM builds after `n_tasks` permuted Fashion-MNIST tasks (real images; untrained MLP)."""
    from ..nn import MLP
    from .memory import GradientProjectionMemory
    from .streams import permuted_stream

    torch.manual_seed(seed)
    model = MLP(784, (100, 100), 10, bias=False)
    mem = GradientProjectionMemory(model, None, lambda t, i: (0.95, 0.99, 0.99)[i], 300)
    for t, task in enumerate(permuted_stream(n_tasks, n_train=2000, n_test=10, seed=seed)):
        mem.update(mem.collect(model, task.loader(300, seed)), t)
    return model, mem


def _step_comparisons(n_tasks: int, device: str) -> list[Comparison]:
    from .layer import LayerPatch

    model, mem = _pmnist_bases(n_tasks)
    model.to(device)
    mem.bases = {k: v.to(device) for k, v in mem.bases.items()}
    mem._factors = {}
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(64, 784, generator=g).to(device)
    y = torch.randint(0, 10, (64,), generator=g).to(device)
    patches = dict(zip(mem.names, (LayerPatch(mod) for mod in mem.modules.values())))

    def run(mode: str):
        def steps():  # 20 steps per timing sample so timer noise is small
            for name, p in patches.items():
                p.factor = mem.factor(name) if mode == "input" else None
            for _ in range(20):
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(model(x), y).backward()
                if mode == "weight":  # GPM's way: project each weight gradient after backward
                    mem.project_()
                opt.step()
        return steps

    t_in, t_plain = time_pair(run("input"), run("plain"), rounds=3, warmup=1, repeat=5, device=device)
    t_w, t_plain2 = time_pair(run("weight"), run("plain"), rounds=3, warmup=1, repeat=5, device=device)
    for p in patches.values():
        p.detach()
    label = f"gpm-step ({n_tasks} tasks, r={'/'.join(str(d) for d in mem.dims().values())})"
    return [Comparison(label, "GPM input-side projection", "plain SGD", t_in, t_plain, 1.2, "ratio",
                       note="20 steps, batch 64"),
            Comparison(label, "GPM weight-gradient projection", "plain SGD", t_w, t_plain2, None, "ratio")]


@register_benchmark("gpm-step", "PMNIST MLP SGD step at batch 64: GPM projection overhead vs plain SGD")
def bench_step(device: str = "cpu") -> list[Comparison]:
    return [c for n_tasks in (2, 5, 9) for c in _step_comparisons(n_tasks, device)]
