"""Exactly balanced spherical k-means over FFN keys, and the neuron permutation it implies.

EMoE (paper §3.1; official code: k-means-constrained on L2-normalised key rows) groups the d_ff
neurons of an FFN into N experts of exactly m = d_ff / N neurons. We solve the same problem
without scipy/ortools:

- Lloyd iterations on unit vectors (spherical k-means: centroids are renormalised means), because
  the quality we report is the mean cosine of a key to its centroid;
- the balanced assignment step ("each cluster gets exactly m points, maximise total similarity")
  is a transportation problem. We solve it with a vectorised Jacobi *auction* (Bertsekas): every
  unassigned point bids for its best cluster, a cluster keeps its m highest bids. The result is
  within n*eps of the optimal assignment (eps-complementary slackness), and the cluster prices are
  warm-started across Lloyd iterations, so later iterations need only a few rounds.

Labels are cached in memory per layer, keyed by a hash of the key matrix and the settings.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import torch

from ..core.errors import UserError

_CACHE: OrderedDict[str, torch.Tensor] = OrderedDict()
_CACHE_SIZE = 256


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _kmeanspp(x: torch.Tensor, k: int, g: torch.Generator) -> torch.Tensor:
    """k-means++ seeding on unit vectors (squared distance = 2 - 2 cos)."""
    n = x.shape[0]
    first = int(torch.randint(n, (1,), generator=g))
    centers = [x[first]]
    d2 = (2 - 2 * (x @ x[first])).clamp_min(0)
    for _ in range(1, k):
        total = d2.sum()
        if total <= 0:  # all points coincide with a centre: pick uniformly
            i = int(torch.randint(n, (1,), generator=g))
        else:
            i = int(torch.multinomial(d2 / total, 1, generator=g))
        centers.append(x[i])
        d2 = torch.minimum(d2, (2 - 2 * (x @ x[i])).clamp_min(0))
    return torch.stack(centers)


def balanced_assign(sim: torch.Tensor, size: int, price: torch.Tensor | None = None, eps: float | None = None,
                    max_rounds: int = 100_000) -> tuple[torch.Tensor, torch.Tensor]:
    """Assign n points to N clusters, exactly `size` each, maximising sum of sim[i, label[i]].

    Jacobi auction with eps-scaling. Returns (labels, prices); pass the prices back in to
    warm-start the next call with a slightly changed `sim`.
    """
    n, k = sim.shape
    if n != k * size:
        raise UserError(f"balanced assignment needs n == clusters * size, got {n} != {k} * {size}")
    sim = sim.double()
    price = torch.zeros(k, dtype=torch.float64) if price is None else price.double().clone()
    spread = float(sim.max() - sim.min()) or 1.0
    final_eps = eps if eps is not None else spread * 1e-4 / max(1, n) ** 0.5
    # eps-scaling: a coarse auction settles prices fast, finer passes only repair the assignment
    schedule = []
    e = spread * 0.05
    while e > final_eps:
        schedule.append(e)
        e /= 8
    schedule.append(final_eps)
    rows = torch.arange(n)
    for e in schedule:
        label = torch.full((n,), -1, dtype=torch.long)
        held = torch.full((n,), float("-inf"), dtype=torch.float64)
        for _ in range(max_rounds):
            free = (label < 0).nonzero().squeeze(1)
            if free.numel() == 0:
                break
            val = sim[free] - price
            top = val.topk(2, dim=1) if k > 1 else (val, torch.zeros(len(free), 1, dtype=torch.long))
            if k > 1:
                best, second, choice = top.values[:, 0], top.values[:, 1], top.indices[:, 0]
            else:
                best, second, choice = val[:, 0], val[:, 0], torch.zeros(len(free), dtype=torch.long)
            label[free] = choice
            held[free] = price[choice] + (best - second) + e
            # every cluster keeps its `size` highest bids; the rest are evicted and bid again
            order = torch.sort(held, descending=True, stable=True).indices
            grouped = order[torch.sort(label[order], stable=True).indices]
            lab_sorted = label[grouped]
            counts = torch.bincount(lab_sorted[lab_sorted >= 0], minlength=k)
            starts = torch.cumsum(counts, 0) - counts
            n_free = int((lab_sorted < 0).sum())
            assigned = grouped[n_free:]
            rank = rows[: len(assigned)] - starts[label[assigned]]
            evict = assigned[rank >= size]
            label[evict] = -1
            held[evict] = float("-inf")
            full = counts >= size
            if full.any():
                # price of a full cluster = its lowest kept bid (the cheapest slot)
                kept = assigned[rank == size - 1]
                price[label[kept]] = held[kept]
        else:
            raise RuntimeError("balanced k-means auction did not converge; please report this")
    return label, price


def balanced_kmeans(keys: torch.Tensor, num_clusters: int, *, seed: int = 0, n_init: int = 4,
                    max_iter: int = 60, tol: float = 1e-5) -> torch.Tensor:
    """Labels (n,) in [0, num_clusters), each used exactly n / num_clusters times.

    Rows are L2-normalised first (cosine k-means, as in EMoE). Deterministic given `seed`.
    """
    n = keys.shape[0]
    if num_clusters < 1 or n % num_clusters:
        raise UserError(f"num_experts={num_clusters} must divide the FFN width d_ff={n}; "
                        f"divisors near it: {_divisors_near(n, num_clusters)}")
    size = n // num_clusters
    x = _normalize(keys.detach().float().cpu())
    if num_clusters == 1:
        return torch.zeros(n, dtype=torch.long)
    best_labels, best_obj = None, float("-inf")
    for r in range(n_init):
        g = torch.Generator().manual_seed(seed * 7919 + r)
        centers = _kmeanspp(x, num_clusters, g)
        labels, price, last = None, None, float("-inf")
        for _ in range(max_iter):
            sim = x @ centers.T
            new, price = balanced_assign(sim, size, price)
            obj = float(sim.gather(1, new[:, None]).mean())
            # converged: labels stable, or the objective moved by < tol (late iterations only swap a
            # handful of near-tied neurons, which matters for speed on 11008-wide layers, not quality)
            if labels is not None and (torch.equal(new, labels) or obj - last < tol * abs(last)):
                labels = new
                break
            labels, last = new, obj
            centers = _normalize(torch.zeros_like(centers).index_add_(0, labels, x))
        obj = mean_cosine_to_centroid(x, labels, num_clusters)
        if obj > best_obj:
            best_labels, best_obj = labels, obj
    return best_labels


def mean_cosine_to_centroid(keys: torch.Tensor, labels: torch.Tensor, num_clusters: int) -> float:
    """Clustering quality: mean cosine between each (normalised) key and its cluster's mean direction."""
    x = _normalize(keys.detach().float().cpu())
    labels = torch.as_tensor(labels, dtype=torch.long).cpu()
    centers = _normalize(torch.zeros(num_clusters, x.shape[1]).index_add_(0, labels, x))
    return float((x * centers[labels]).sum(1).mean())


def _divisors_near(n: int, k: int) -> list[int]:
    divs = [d for d in range(1, n + 1) if n % d == 0]
    return sorted(divs, key=lambda d: abs(d - k))[:4]


def labels_to_permutation(labels: torch.Tensor, num_clusters: int) -> torch.Tensor:
    """perm such that neurons of expert e occupy positions [e*m, (e+1)*m) (stable within an expert)."""
    return torch.sort(torch.as_tensor(labels, dtype=torch.long), stable=True).indices


def split_permutation(keys: torch.Tensor, num_experts: int, split: str, seed: int, n_init: int,
                      max_iter: int) -> torch.Tensor:
    """The neuron order that makes every expert a contiguous block, for a given split method (cached)."""
    d_ff = keys.shape[0]
    if num_experts < 1 or d_ff % num_experts:
        raise UserError(f"num_experts={num_experts} must divide the FFN width d_ff={d_ff}; "
                        f"divisors near it: {_divisors_near(d_ff, num_experts)}")
    if split == "contiguous":
        return torch.arange(d_ff)
    if split == "random":
        return torch.randperm(d_ff, generator=torch.Generator().manual_seed(seed))
    k = keys.detach().float().cpu().contiguous()
    h = hashlib.sha1(k.numpy().tobytes())
    h.update(f"{num_experts}/{seed}/{n_init}/{max_iter}".encode())
    key = h.hexdigest()
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key].clone()
    labels = balanced_kmeans(k, num_experts, seed=seed, n_init=n_init, max_iter=max_iter)
    perm = labels_to_permutation(labels, num_experts)
    _CACHE[key] = perm
    if len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return perm.clone()
