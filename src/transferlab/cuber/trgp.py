"""TRGP (trust regions + scaled weight projection) and CUBER (backward transfer in Regime 3).

TRGP (Lin et al., ICLR 2022, Sec. 4): per task and layer it keeps the basis the task *selected*
(old global vectors along which the task has energy, plus new residual vectors). Before a new
task, one probe gradient g_l per layer measures ||g_l M_j M_j^T|| / ||g_l|| for every old task j;
the top-k tasks above eps_1 get a trainable scaling matrix Q (W_eff = W + W U (Q - I) U^T),
trained with the new task and re-inserted whenever that task is evaluated.

CUBER (Lin et al., NeurIPS 2022) splits the selected ("sufficient projection") tasks by a
positive-correlation test and, for those, lets the new task's update move inside the old task's
subspace so the old task can improve. The exact tests are [reconstructed]; they are plain
functions below (`projection_ratio`, `cosine_correlation` / `full_cosine`, `backward_step`,
`in_subspace_step`) and can be swapped.
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.errors import UserError
from .config import CUBERConfig, TRGPConfig
from .memory import _orthonormal_against, left_spectrum
from .strategies import GPM, Forward, check_loader, take_samples

REGIME_WEAK, REGIME_TRUST, REGIME_POSITIVE = 1, 2, 3


def projection_ratio(g: torch.Tensor, U: torch.Tensor) -> float:
    """||g U U^T|| / ||g|| for a (out x m) gradient and an orthonormal (m x r) basis."""
    n = g.norm()
    return 0.0 if n == 0 or U.shape[1] == 0 else ((g @ U).norm() / n).item()


def _cosine(a: torch.Tensor, b: torch.Tensor, ref_a: torch.Tensor, ref_b: torch.Tensor) -> float:
    """cos(a, b), or nan when either side has no direction: a zero vector (or one below 1e-6 of
    the full gradient it came from) is correlated with nothing, positively or negatively."""
    na, nb = a.norm(), b.norm()
    if na <= 1e-6 * ref_a.norm() or nb <= 1e-6 * ref_b.norm() or na == 0 or nb == 0:
        return float("nan")
    return ((a * b).sum() / (na * nb)).item()


def cosine_correlation(g_new: torch.Tensor, g_old: torch.Tensor, U: torch.Tensor) -> float:
    """[reconstructed] cos(P g_new, P g_old), P = projection onto span(U) (right-multiplication);
    nan when either projection vanishes."""
    return _cosine(g_new @ U, g_old @ U, g_new, g_old)  # coordinates: same inner products as projections


def full_cosine(g_new: torch.Tensor, g_old: torch.Tensor, U: torch.Tensor) -> float:
    """[reconstructed] cos(g_new, g_old) over the whole layer, ignoring the subspace U; nan for a zero gradient."""
    return _cosine(g_new, g_old, g_new, g_old)


def classify(g_new: torch.Tensor, U: torch.Tensor, eps_proj: float, g_old: torch.Tensor | None = None,
             eps_corr: float | None = None, correlation=cosine_correlation) -> tuple[int, float, float]:
    """Regime of one (layer, old task): 1 weak projection, 2 trust region, 3 trust region + positive correlation.

    Returns (regime, projection ratio, correlation); correlation is nan when not tested.
    """
    ratio = projection_ratio(g_new, U)
    if ratio <= eps_proj:
        return REGIME_WEAK, ratio, float("nan")
    if g_old is None or eps_corr is None:
        return REGIME_TRUST, ratio, float("nan")
    corr = correlation(g_new, g_old, U)
    positive = corr == corr and corr >= eps_corr  # nan (undefined correlation) is never positive
    return (REGIME_POSITIVE if positive else REGIME_TRUST), ratio, corr


def in_subspace_step(g: torch.Tensor, B: torch.Tensor, anchors: list[torch.Tensor], rule: str = "agem",
                     scale: float = 1.0) -> torch.Tensor:
    """[reconstructed] The part of gradient g kept inside span(B) for Regime-3 old tasks.

    d = scale * g B B^T. The SGD step -lr*d changes old task j's loss by about -lr <d, h_j> (h_j its
    stored in-subspace gradient), so a negative <d, h_j> would raise it: `agem` removes that
    component (A-GEM's single-constraint projection, done for each anchor), `gate` drops d, `free`
    keeps d as is. `along` keeps only the part of g along the old tasks' own descent directions h_j
    (orthonormalised), and only where <g, h_j> > 0: the old model moves only where both tasks' losses
    fall to first order.
    """
    if rule == "along":
        return _along_anchors(g, anchors) * scale
    d = ((g @ B) @ B.T) * scale
    if rule == "free":
        return d
    for h in anchors:
        dot = (d * h).sum()
        if dot < 0:
            if rule == "gate":
                return torch.zeros_like(d)
            d = d - dot / (h * h).sum().clamp_min(1e-30) * h
    return d


def backward_step(g: torch.Tensor, anchors: list[torch.Tensor], others: list[torch.Tensor],
                  scale: float = 1.0) -> torch.Tensor:
    """[reconstructed, reading (a)] An explicit backward-transfer step for Regime-3 old tasks.

    d = scale * sum_j h_j over the Regime-3 anchors h_j (old task j's stored gradient inside S_j)
    with <h_j, g> > 0, i.e. the SGD step -lr*d lowers the new task's first-order loss (by lr<d, g>)
    as well as task j's (by lr*scale*||h_j||^2). The step is dropped if it would raise any old task's
    first-order loss (<d, h_k> < 0 for an anchor h_k in `others`: every old task's stored anchor).
    """
    d = torch.zeros_like(g)
    for h in anchors:
        if (h * g).sum() > 0:
            d = d + scale * h
    if any((d * h).sum() < 0 for h in others):
        return torch.zeros_like(g)
    return d


def _along_anchors(g: torch.Tensor, anchors: list[torch.Tensor]) -> torch.Tensor:
    d = torch.zeros_like(g)
    basis: list[torch.Tensor] = []
    for h in anchors:  # Gram-Schmidt over the anchors (flattened weight-space directions)
        v = h.clone()
        for b in basis:
            v = v - (v * b).sum() * b
        n = v.norm()
        if n > 1e-12 * max(h.norm().item(), 1e-30):
            basis.append(v / n)
    for b in basis:
        dot = (g * b).sum()
        if dot > 0:
            d = d + dot * b
    return d


def task_basis(M_old: torch.Tensor | None, A: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """TRGP's per-task basis and the new directions it adds to the protected (global) basis.

    First task: GPM's strict rule (top singular vectors whose cumulative energy stays below eps;
    the crossing vector is not kept). Later tasks: old global vectors (energy u_i^T A A^T u_i) and
    the residual's singular vectors (energy sigma_i^2) are ranked together and taken until the
    selected energy reaches eps * ||A||_F^2 (the crossing entry is kept, at most m entries).
    Returns (B, new): B (m x r) is the task's basis, `new` (m x k) the selected residual
    directions, orthonormal to M_old. The protected basis must grow by exactly `new` (TRGP's rule)
    so that span(B) stays inside it; growing it by GPM's rule instead can leave part of B outside.
    (The official code's `sel_index > r_pre` test skips the top-ranked new direction, index r_pre;
    here every selected new direction is added.)
    """
    A = A.double()
    m = A.shape[0]
    total = (A * A).sum().clamp_min(1e-30)
    if M_old is None or M_old.shape[1] == 0:
        U, s2 = left_spectrum(A)
        r = int((torch.cumsum(s2, 0) / total < eps).sum())
        B = _orthonormal_against(None, U[:, :r])
        return B, B
    M = M_old.double()
    delta = ((M.T @ A) ** 2).sum(1)  # u_i^T A A^T u_i for each old vector
    R = A - M @ (M.T @ A)
    U, s2 = left_spectrum(R)
    energy = torch.cat([delta, s2])
    order = torch.argsort(energy, descending=True)
    cum = torch.cumsum(energy[order], 0) / total
    r = min(int((cum < eps).sum()) + 1, len(order), m)
    sel = order[:r]
    r_old = M.shape[1]
    old_idx = sel[sel < r_old]
    new = _orthonormal_against(M, U[:, sel[sel >= r_old] - r_old])
    new = new[:, : m - r_old]
    return torch.cat([M[:, old_idx], new], 1), new


class TRGP(GPM):
    """GPM + trust regions + scaled weight projection (forward transfer without touching old tasks)."""

    name = "trgp"

    def __init__(self, model: nn.Module, config: TRGPConfig | None = None, forward: Forward | None = None,
                 layers: list[str] | None = None):
        super().__init__(model, config or TRGPConfig(), forward, layers)
        self.task_bases: list[dict[str, torch.Tensor]] = []  # per finished task: layer -> basis (m x r_j)
        self.scales: dict[int, dict[str, list[tuple[int, torch.Tensor]]]] = {}  # task -> layer -> [(j, Q)]
        self.regimes: dict[int, dict[str, list[tuple[int, int, float, float]]]] = {}  # diagnostics

    # ---- probe gradients ---------------------------------------------------------------------
    def layer_grads(self, task_id: int, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-layer (out x m) weight gradients of the task loss on one batch (plain layers, no projection)."""
        saved = [(p.factor, p.scales) for p in self.patches.values()]
        for p in self.patches.values():
            p.factor = None
        was = self.model.training
        self.model.eval()
        try:
            self.model.zero_grad(set_to_none=True)
            self.loss(x, y, task_id).backward()
            out = {}
            for n, mod in self.memory.modules.items():
                g = mod.weight.grad
                out[n] = (torch.zeros_like(mod.weight) if g is None else g.detach().clone()).reshape(
                    mod.weight.shape[0], -1)
            self.model.zero_grad(set_to_none=True)
            return out
        finally:
            self.model.train(was)
            for p, (f, s) in zip(self.patches.values(), saved):
                p.factor, p.scales = f, s

    def _regime(self, layer: str, j: int, g: torch.Tensor) -> tuple[int, float, float]:
        return classify(g, self.task_bases[j][layer], self.cfg.eps_proj)

    def before_task(self, task_id: int, loader) -> None:
        check_loader(loader)
        self.task_id = task_id
        self.scales[task_id] = {}
        self.regimes[task_id] = {}
        for p in self.patches.values():
            p.scales = []
        if task_id > 0 and self.task_bases:
            x, y = take_samples(loader, self.cfg.probe_samples)
            grads = self.layer_grads(task_id, x, y)
            for n in self.memory.names:
                res = [(j, *self._regime(n, j, grads[n])) for j in range(len(self.task_bases))]
                self.regimes[task_id][n] = res
                chosen = sorted((r for r in res if self._scaled(r[1])), key=lambda r: -r[2])[: self.cfg.top_k]
                self.scales[task_id][n] = [
                    (j, torch.eye(self.task_bases[j][n].shape[1], device=self.device).requires_grad_(True))
                    for j, *_ in chosen]
        self._set_projection()
        self.use_task(task_id)

    def _scaled(self, regime: int) -> bool:
        return regime == REGIME_TRUST

    def use_task(self, task_id: int) -> None:
        for n, p in self.patches.items():
            p.scales = [(self.task_bases[j][n], Q) for j, Q in self.scales.get(task_id, {}).get(n, [])]

    def extra_parameters(self) -> list[torch.Tensor]:
        return [Q for qs in self.scales.get(self.task_id, {}).values() for _, Q in qs]

    def after_task(self, task_id: int, loader) -> None:
        check_loader(loader)
        for qs in self.scales.get(task_id, {}).values():
            for k, (j, Q) in enumerate(qs):
                qs[k] = (j, Q.detach().requires_grad_(False))
        for p in self.patches.values():
            p.factor = None
        reps = self.representations(task_id, loader)
        bases = {}
        for i, n in enumerate(self.memory.names):
            if n in reps:
                old = self.memory.bases.get(n)
                B, new = task_basis(None if old is None else old.double(), reps[n], self.memory.threshold(task_id, i))
                self.memory.extend(n, new)  # TRGP's rule: exactly the selected new directions
                bases[n] = B.float().to(self.device)
        self.task_bases.append(bases)
        self.use_task(task_id)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "task_bases": self.task_bases, "scales": self.scales,
                "regimes": self.regimes}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.task_bases, self.scales, self.regimes = state["task_bases"], state["scales"], state["regimes"]


class CUBER(TRGP):
    """TRGP + Regime 3: in-subspace updates for positively correlated old tasks (positive BWT).

    After each task j it stores, per layer, g_j = grad of task j's loss at its final weights (an
    (out x m) gradient, not data). Before task t each (layer, old task) is classified by
    `classify`; Regime-3 tasks' subspaces form B_l, and every step adds `backward_step` (default,
    reading (a)) or `in_subspace_step(g, B_l)` on top of GPM's projected gradient; `share_q`
    (reading (b)) instead lets old tasks adopt the new task's scaling matrices after the task.
    """

    name = "cuber"

    def __init__(self, model: nn.Module, config: CUBERConfig | None = None, forward: Forward | None = None,
                 layers: list[str] | None = None):
        cfg = config or CUBERConfig()
        if not isinstance(cfg, CUBERConfig):
            raise UserError("CUBER needs a CUBERConfig")
        super().__init__(model, cfg, forward, layers)
        self.task_grads: list[dict[str, torch.Tensor]] = []
        self.q_grads: list[dict[str, torch.Tensor]] = []  # share_q: dL_j/dQ for a scaling on S_j, at Q = I
        self.others: dict[str, list[torch.Tensor]] = {}  # backward: every old task's anchor per layer
        self.positive: dict[str, tuple[torch.Tensor, list[torch.Tensor]]] = {}  # layer -> (B, anchors)
        self.start: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # layer -> (W at task start, ||W B||)
        self._window: dict[str, tuple] = {}  # layer -> (weight version, grad tensor, output, raw) of the last call

    def feed_projected(self, xp: torch.Tensor) -> None:
        if self.first_layer not in self.positive:  # a Regime-3 layer needs its raw gradient
            super().feed_projected(xp)

    def _regime(self, layer: str, j: int, g: torch.Tensor) -> tuple[int, float, float]:
        corr = full_cosine if self.cfg.corr_space == "full" else cosine_correlation
        return classify(g, self.task_bases[j][layer], self.cfg.eps_proj, self.task_grads[j][layer],
                        self.cfg.eps_corr, corr)

    def _anchor(self, n: str, j: int) -> torch.Tensor:
        """Old task j's stored gradient restricted to its own subspace S_j (a weight-space direction)."""
        U = self.task_bases[j][n]
        return (self.task_grads[j][n] @ U) @ U.T

    def _scaled(self, regime: int) -> bool:
        return regime == REGIME_TRUST or (regime == REGIME_POSITIVE and self.cfg.scale_regime3)

    def before_task(self, task_id: int, loader) -> None:
        super().before_task(task_id, loader)
        self.positive, self.start, self.others, self._window = {}, {}, {}, {}
        if self.cfg.rule == "share_q":  # reading (b): the weights move as in TRGP; see after_task
            self._set_projection()
            return
        for n, res in self.regimes.get(task_id, {}).items():
            pos = [j for j, regime, *_ in res if regime == REGIME_POSITIVE]
            if not pos:
                continue
            self.others[n] = [self._anchor(n, j) for j in range(len(self.task_bases))]
            U = torch.cat([self.task_bases[j][n] for j in pos], 1).double()
            M = self.memory.bases[n].double()
            U = M @ (M.T @ U)  # only the protected span: outside it GPM already lets the weights move
            Uo, S, _ = torch.linalg.svd(U, full_matrices=False)  # orthonormal basis of the union
            B = Uo[:, S > 1e-6 * S[0]].float()
            anchors = [self._anchor(n, j) for j in pos]
            self.positive[n] = (B, anchors)
            w0 = self.memory.modules[n].weight.detach().reshape(len(self.memory.modules[n].weight), -1).clone()
            self.start[n] = (w0, (w0 @ B).norm().clamp_min(1e-12))
        self._set_projection(exclude=set(self.positive))  # Regime-3 layers need the full gradient

    def after_backward(self, model=None) -> None:
        """Project and add the Regime-3 step; may be called after every backward of an accumulation.

        Within one optimizer step (detected by the weight's version counter, which `optimizer.step`
        bumps) repeated calls see the accumulated raw gradient: the previous call's output is
        replaced, not added to, so the step is applied once per optimizer step for k micro-batches.
        """
        keep = {}
        for n, (B, anchors) in self.positive.items():
            w = self.memory.modules[n].weight
            if w.grad is None:
                continue
            g = w.grad.view(w.shape[0], -1)
            prev = self._window.get(n)
            if prev is not None and prev[0] == w._version and prev[1] is w.grad:
                with torch.no_grad():  # raw accumulated gradient = what arrived since + raw before
                    g.add_(prev[3] - prev[2])
            raw = g.detach().clone()
            if self.cfg.rule == "backward":
                d = backward_step(g, anchors, self.others.get(n, []), self.cfg.step_scale)
            else:
                d = in_subspace_step(g, B, anchors, self.cfg.rule, self.cfg.step_scale)
            keep[n] = (d * self._budget(n, w, B), raw)
        super().after_backward(model)
        with torch.no_grad():
            for n, (d, raw) in keep.items():
                w = self.memory.modules[n].weight
                g = w.grad.view(w.shape[0], -1)
                g.add_(d)
                self._window[n] = (w._version, w.grad, g.detach().clone(), raw)

    @torch.no_grad()
    def _budget(self, n: str, w: torch.Tensor, B: torch.Tensor) -> float:
        """[reconstructed] Trust region for the in-subspace move: steps fade out linearly as the
        in-subspace displacement since the task began reaches `trust_radius` x the in-subspace weight
        norm. The first-order reasoning behind Regime 3 only holds near W_{t-1}, and without data
        there is no later signal that an old task has stopped improving."""
        if self.cfg.trust_radius <= 0:
            return 1.0
        w0, ref = self.start[n]
        moved = ((w.view(w.shape[0], -1) - w0) @ B).norm()
        return max(0.0, 1.0 - (moved / (self.cfg.trust_radius * ref)).item())

    def after_task(self, task_id: int, loader) -> None:
        check_loader(loader)
        self.use_task(task_id)
        x, y = take_samples(loader, self.cfg.grad_samples)
        self.task_grads.append(self.layer_grads(task_id, x, y))
        if self.cfg.rule == "share_q":
            self._share_scales(task_id)
        super().after_task(task_id, loader)
        if self.cfg.rule == "share_q":
            self.q_grads.append(self._scale_grads(task_id, x, y))
            self.use_task(task_id)
        self.positive = {}

    @torch.no_grad()
    def _share_scales(self, t: int) -> None:
        """[reconstructed, reading (b)] Old task j adopts the re-mixing that the positively correlated
        new task t learnt on S_j: W_eff,j gains W U_j (gamma (Q_tj - I)) U_j^T, kept only when the
        stored dL_j/dQ says it lowers j's loss to first order (<dL_j/dQ, Q_tj - I> < 0). Only task j's
        evaluation changes; the shared weights and every other task are untouched."""
        for n, qs in self.scales.get(t, {}).items():
            regimes = {j: reg for j, reg, *_ in self.regimes[t].get(n, [])}
            for j, Q in qs:
                if regimes.get(j) != REGIME_POSITIVE or j >= len(self.q_grads):
                    continue
                dQ = Q.detach() - torch.eye(Q.shape[0], device=Q.device)
                if (self.q_grads[j][n] * dQ).sum() < 0:
                    share = torch.eye(Q.shape[0], device=Q.device) + self.cfg.step_scale * dQ
                    self.scales.setdefault(j, {}).setdefault(n, []).append((j, share))

    def _scale_grads(self, j: int, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """dL_j/dQ at Q = I for an extra scaling on task j's own basis U_j (a gradient, no data kept)."""
        self.use_task(j)
        extra = {}
        for n, p in self.patches.items():
            Q = torch.eye(self.task_bases[j][n].shape[1], device=self.device).requires_grad_(True)
            p.scales = p.scales + [(self.task_bases[j][n], Q)]
            extra[n] = Q
        self.layer_grads(j, x, y)  # fills Q.grad as a side effect (patches keep their scales)
        out = {n: Q.grad.detach().clone() if Q.grad is not None else torch.zeros_like(Q) for n, Q in extra.items()}
        self.use_task(j)
        return out

    def state_dict(self) -> dict:
        return {**super().state_dict(), "task_grads": self.task_grads, "q_grads": self.q_grads}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.task_grads = state["task_grads"]
        self.q_grads = state.get("q_grads", [])
