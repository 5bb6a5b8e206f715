"""`MetaDMoE`: experts, aggregator and student, with the four training stages and test-time `adapt`.

Shapes: experts and student map images to features [B, D] via `features(x)` and features to logits via
`head(z)`; the aggregator fuses the experts' features [B, N, D] into the teacher feature [B, D].
The student adapts to an unlabeled batch with one SGD step on MSE(student.features(x), teacher(x));
its head is shared and never adapted (official `train_kd`/`eval`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ..core.errors import UserError
from ..nn import batches
from .aggregator import Aggregator
from .config import MetaDMoEConfig
from .layout import Layout

Domain = tuple[torch.Tensor, torch.Tensor]  # (images, labels) of one source domain


def check_backbone(module, role: str) -> None:
    """Raise a UserError naming what a backbone lacks (Meta-DMoE needs `features(x)` and `head(z)`)."""
    if not isinstance(module, nn.Module):
        raise UserError(f"{role} must be a torch.nn.Module, got {type(module).__name__}")
    missing = [m for m in ("features", "head") if not callable(getattr(module, m, None))]
    if missing:
        raise UserError(f"{role} ({type(module).__name__}) has no {' or '.join(f'{m}()' for m in missing)}; "
                        "Meta-DMoE needs features(x) -> [B, D] and head(z) -> logits, e.g. "
                        "transferlab.nn.SmallCNN, or add these two methods to your module")


def check_batch(x, name: str, input_shape: tuple[int, ...] | None = None) -> None:
    """Reject empty, wrongly shaped or non-finite batches before anything is computed or changed."""
    if not isinstance(x, torch.Tensor):
        raise UserError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise UserError(f"{name} must be a floating-point tensor (e.g. x.float() / 255), got {x.dtype}")
    if x.dim() < 2 or x.shape[0] == 0:
        raise UserError(f"{name} must be a non-empty batch [B, ...] with B >= 1, got shape {tuple(x.shape)}")
    if input_shape is not None and tuple(x.shape[1:]) != tuple(input_shape):
        raise UserError(f"{name} has per-sample shape {tuple(x.shape[1:])} but the model was trained on "
                        f"{tuple(input_shape)}; reshape the batch to [B, {', '.join(map(str, input_shape))}]")
    if not torch.isfinite(x).all():
        raise UserError(f"{name} contains NaN or infinite values; clean or drop those samples first")


class _View(nn.Module):
    """Lets `functional_call` run `features` (or head∘features) of a module with substituted parameters."""

    def __init__(self, module: nn.Module, logits: bool):
        super().__init__()
        self.m, self.logits = module, logits

    def forward(self, x):
        z = self.m.features(x)
        return self.m.head(z) if self.logits else z


def call_with(module: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor, logits: bool) -> torch.Tensor:
    """`module.features(x)` (or logits) with `params` in place of the module's own parameters."""
    return functional_call(_View(module, logits), {"m." + k: v for k, v in params.items()}, (x,))


def buffer_copies(module: nn.Module) -> dict[str, torch.Tensor]:
    """Clones of a module's buffers: passed to `functional_call` in train mode, BN updates these, not the module."""
    return {n: b.detach().clone() for n, b in module.named_buffers()}


class AdaptedStudent:
    """The student with adapted feature parameters; the stored student is never modified.

    `layout` is the `MetaDMoE`'s layout policy (layout.py): it changes speed, not values.
    `batch_stats=True` (`MetaDMoEConfig.train_mode="train"`) normalises every predicted batch with its
    own BN statistics, on copies of the running buffers, so the stored ones stay as they are.
    """

    def __init__(self, student: nn.Module, params: dict[str, torch.Tensor], input_shape=None,
                 layout: Layout | None = None, batch_stats: bool = False):
        self.student, self.params, self.input_shape = student, params, input_shape
        self.layout = layout or Layout()
        self.batch_stats = batch_stats

    def _call(self, x: torch.Tensor, logits: bool) -> torch.Tensor:
        params = {**self.params, **buffer_copies(self.student)} if self.batch_stats else self.params
        return self.layout.run(lambda xx: call_with(self.student, params, xx, logits=logits), x)

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self._call(x, logits=False)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        check_batch(x, "x", self.input_shape)
        was = self.student.training
        self.student.train(self.batch_stats)
        try:
            return self._call(x, logits=True)
        finally:
            self.student.train(was)

    __call__ = predict


@torch.no_grad()
def _val_accuracy(module: nn.Module, val: Sequence[Domain], device) -> float:
    """Pooled eval-mode accuracy of `module.head(module.features(x))` over (x, y) pairs."""
    was = module.training
    module.eval()
    correct = total = 0
    try:
        for x, y in val:
            for b in torch.arange(len(x)).split(512):
                correct += (module.head(module.features(x[b].to(device))).argmax(-1).cpu() == y[b]).sum().item()
            total += len(x)
    finally:
        module.train(was)
    return correct / max(total, 1)


class MetaDMoE(nn.Module):
    """Meta-distillation from a mixture of domain experts (Zhong et al., NeurIPS 2022).

    Args:
        experts: one backbone per source domain (or domain group), each with `features`/`head`.
        aggregator: an `Aggregator(dim=D)`; may be None when `config.teacher == "average"`.
        student: the backbone that is adapted at test time; `features(x)` must return [B, D].
        config: `MetaDMoEConfig`.
        groups: `groups[d]` = index of the expert trained on source domain d (default: domain d -> expert d).
        input_shape: per-sample shape, checked on every batch (optional).
        channels_last: layout of 4-D image batches in the teacher, `adapt` and `predict` (layout.py):
            None (default) = channels-last on CPU, where NCHW pooling/convolution is several times slower;
            True/False force it on/off. Values are the same up to float rounding; weights are never touched.
        student_pretrained: the student passed in is already trained (elsewhere), so `train_experts` may
            copy it (`expert_init="student"`) without `pretrain_student` first. Saved in the state dict.
    """

    def __init__(self, experts: Sequence[nn.Module], aggregator: Aggregator | None, student: nn.Module,
                 config: MetaDMoEConfig | None = None, groups: Sequence[int] | None = None,
                 input_shape: Sequence[int] | None = None, channels_last: bool | None = None,
                 student_pretrained: bool = False):
        super().__init__()
        # persistent, so a model restored from a state dict remembers that its student was trained
        self.register_buffer("student_ready", torch.tensor(bool(student_pretrained)))
        self._register_load_state_dict_pre_hook(self._default_student_ready)
        self.config = config or MetaDMoEConfig()
        if len(experts) == 0:
            raise UserError("MetaDMoE needs at least one expert")
        for i, e in enumerate(experts):
            check_backbone(e, f"expert {i}")
        check_backbone(student, "student")
        if aggregator is None and self.config.teacher == "aggregator":
            raise UserError("pass an Aggregator, or set MetaDMoEConfig(teacher='average') to average the experts")
        if groups is not None and any(not 0 <= g < len(experts) for g in groups):
            raise UserError(f"groups must map every domain to an expert index in [0, {len(experts)})")
        self.experts = nn.ModuleList(experts)
        self.aggregator = aggregator
        self.student = student
        self.groups = tuple(groups) if groups is not None else tuple(range(len(experts)))
        self.input_shape = tuple(input_shape) if input_shape is not None else None
        if channels_last not in (None, True, False):
            raise UserError(f"channels_last must be None (auto), True or False, got {channels_last!r}")
        self.layout = Layout(channels_last)
        self.history: list[dict] = []
        self.curve: list[dict] = []  # meta-training query loss before/after the step, per `log_every` episodes
        self.fit_log: dict[str, dict] = {}  # epochs run / best epoch / validation accuracy of stages 1 and 3

    def _default_student_ready(self, state_dict, prefix, *args):
        """State dicts saved without the flag load as they are; the flag then keeps its constructor value."""
        state_dict.setdefault(prefix + "student_ready", self.student_ready.clone())

    @property
    def device(self) -> torch.device:
        return next(self.student.parameters()).device

    # ---- teacher --------------------------------------------------------------------------------
    @torch.no_grad()
    def expert_tokens(self, x: torch.Tensor, exclude: int | None = None, bn: str = "eval") -> torch.Tensor:
        """Frozen experts' features of x as tokens [B, N, D] (or N-1 without expert `exclude`).

        `bn="batch"` normalises with x's own statistics (experts in train mode); their running
        statistics are restored afterwards, so the experts stay exactly as they were.
        """
        if bn not in ("eval", "batch"):
            raise UserError(f"expert BN mode must be 'eval' or 'batch', got {bn!r}")

        def run(x):  # x is converted once (layout.py) and shared by all experts
            feats = []
            for i, e in enumerate(self.experts):
                if i == exclude:
                    continue  # dropped, not zeroed: the masked expert cannot influence the teacher at all
                was = e.training
                saved = buffer_copies(e) if bn == "batch" else None
                e.train(bn == "batch")
                try:
                    feats.append(e.features(x))
                finally:
                    e.train(was)
                    if saved is not None:
                        for n, b in e.named_buffers():
                            b.copy_(saved[n])
            return torch.stack(feats, dim=1)

        return self.layout.run(run, x)

    def teacher(self, x: torch.Tensor, exclude: int | None = None, bn: str = "eval") -> torch.Tensor:
        """Teacher feature [B, D]; gradients flow into the aggregator (not into the experts)."""
        tokens = self.expert_tokens(x, exclude, bn)
        if self.config.teacher == "average" or self.aggregator is None:
            return tokens.mean(dim=1)
        return self.aggregator.features(tokens)

    def expert_of(self, domain: int) -> int:
        if not 0 <= domain < len(self.groups):
            raise UserError(f"domain {domain} is not a source domain; groups cover domains 0..{len(self.groups) - 1}")
        return self.groups[domain]

    # ---- the inner step -------------------------------------------------------------------------
    def inner_step(self, params: dict[str, torch.Tensor], x: torch.Tensor, target: torch.Tensor, lr: float,
                   create_graph: bool) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """theta' = theta - lr * grad_theta MSE(f(x; theta), target); parameters unused by `features` stay."""
        feats = call_with(self.student, params, x, logits=False)
        if feats.shape != target.shape:
            raise UserError(f"student features {tuple(feats.shape)} and teacher feature {tuple(target.shape)} "
                            "differ; experts and student must share the feature size D")
        loss = F.mse_loss(feats, target)
        names = [n for n, p in params.items() if p.requires_grad and p.is_floating_point()]
        grads = torch.autograd.grad(loss, [params[n] for n in names], create_graph=create_graph, allow_unused=True)
        new = dict(params)
        for n, g in zip(names, grads):
            if g is not None:  # head parameters get no gradient from the feature loss: shared, not adapted
                new[n] = params[n] - lr * g
        return new, loss

    def _check(self, x, name):
        check_batch(x, name, self.input_shape)
        if x.device != self.device:
            raise UserError(f"{name} is on {x.device} but the model is on {self.device}; move it with .to()")

    def adapt(self, unlabeled_x: torch.Tensor, steps: int | None = None, lr: float | None = None,
              exclude_expert: int | None = None, target: torch.Tensor | None = None) -> AdaptedStudent:
        """Adapt the student to one unlabeled target batch (test time, all experts, no labels).

        Returns an `AdaptedStudent`; the stored student, experts and aggregator are left unchanged,
        so each target domain starts from the meta-learned weights. `exclude_expert` drops one expert
        from the teacher, for validating on a source domain as if it were unseen. `target` [B, D]
        replaces the teacher feature (e.g. an oracle: features of a model trained on the target).
        The student runs in `config.train_mode`, the experts' BN in `config.expert_bn`.
        """
        self._check(unlabeled_x, "unlabeled_x")
        steps = self.config.inner_steps if steps is None else steps
        lr = self.config.inner_lr if lr is None else lr
        if steps < 1 or not lr > 0:
            raise UserError(f"adapt needs steps >= 1 and lr > 0, got steps={steps}, lr={lr}")
        if target is not None and (not isinstance(target, torch.Tensor) or target.shape[0] != unlabeled_x.shape[0]):
            raise UserError("target must be a [B, D] tensor with one feature per image of unlabeled_x")
        batch_stats = self.config.train_mode == "train"
        modes = [(m, m.training) for m in (self.student, self.aggregator) if m is not None]
        for m, _ in modes:
            m.eval()  # aggregator dropout off; the student's BN mode is set below
        self.student.train(batch_stats)

        def run(x):  # pure: reads the stored weights, never writes them (so layout.run may repeat it)
            with torch.no_grad():
                t = self.teacher(x, exclude_expert, self.config.expert_bn) if target is None else target
            # detached aliases, not copies: the step builds new tensors, the stored weights are never written
            params = {n: p.detach().requires_grad_(True) for n, p in self.student.named_parameters()}
            bufs = buffer_copies(self.student) if batch_stats else {}  # train-mode BN writes the copies
            with torch.enable_grad():
                for _ in range(steps):  # first order is exact here: nothing differentiates through the step
                    params, _ = self.inner_step({**params, **bufs}, x, t, lr, create_graph=False)
                    params = {n: p.detach().requires_grad_(True) for n, p in params.items() if n not in bufs}
            return params

        try:
            params = self.layout.run(run, unlabeled_x)  # converted once, for teacher and student
        finally:
            for m, was in modes:
                m.train(was)
        return AdaptedStudent(self.student, {n: p.detach() for n, p in params.items()}, self.input_shape,
                              self.layout, batch_stats=batch_stats)

    @torch.no_grad()
    def predict(self, x: torch.Tensor, adapted: AdaptedStudent | None = None) -> torch.Tensor:
        """Logits of the (optionally adapted) student in eval mode."""
        if adapted is not None:
            return adapted.predict(x)
        self._check(x, "x")
        params = dict(self.student.named_parameters())
        was = self.student.training
        self.student.eval()
        try:
            return self.layout.run(lambda xx: call_with(self.student, params, xx, logits=True), x)
        finally:
            self.student.train(was)

    # ---- stage 4: one meta-training episode -----------------------------------------------------
    def meta_loss(self, support_x, query_x, query_y, domain: int) -> tuple[torch.Tensor, dict]:
        """Query loss after the inner step, differentiable w.r.t. student and (second order) aggregator."""
        self._check(support_x, "support_x")
        self._check(query_x, "query_x")
        if not isinstance(query_y, torch.Tensor) or query_y.shape != query_x.shape[:1]:
            raise UserError(f"query_y must be a tensor of {query_x.shape[0]} labels, one per query image")
        cfg = self.config
        exclude = self.expert_of(domain) if cfg.mask_own_expert else None
        if exclude is not None and len(self.experts) < 2:
            raise UserError("mask_own_expert needs at least two experts (one is masked in every episode)")
        # official: eval mode throughout (BN running statistics frozen, aggregator dropout off)
        self.student.train(cfg.train_mode == "train")
        if self.aggregator is not None:
            self.aggregator.train(cfg.train_mode == "train")
        with torch.set_grad_enabled(not cfg.first_order):  # first order: the aggregator gets no gradient
            target = self.teacher(support_x, exclude)
        params = dict(self.student.named_parameters())
        with torch.no_grad():
            before = F.cross_entropy(call_with(self.student, params, query_x, logits=True), query_y)
        for _ in range(cfg.inner_steps):
            params, inner = self.inner_step(params, support_x, target, cfg.inner_lr, create_graph=not cfg.first_order)
        loss = F.cross_entropy(call_with(self.student, params, query_x, logits=True), query_y)
        return loss, {"loss_before": before.item(), "loss_after": loss.item(), "inner_mse": inner.item()}

    def meta_optimizers(self, lr_scale: float = 1.0) -> list[torch.optim.Optimizer]:
        """Adam for student (features + head, lr beta) and aggregator (its own lr), as in the official code."""
        opts = [torch.optim.Adam(self.student.parameters(), lr=self.config.outer_lr * lr_scale)]
        if self.aggregator is not None and self.config.teacher == "aggregator":
            opts.append(torch.optim.Adam(self.aggregator.parameters(), lr=self.config.aggregator_meta_lr * lr_scale))
        return opts

    def meta_step(self, support_x, query_x, query_y, domain: int, optimizers) -> dict:
        """One episode: inner step on the support, CE on the query, one outer update of both optimisers."""
        loss, info = self.meta_loss(support_x, query_x, query_y, domain)
        for o in optimizers:
            o.zero_grad(set_to_none=True)
        loss.backward()
        for o in optimizers:
            o.step()
        return info

    # ---- stages 1-4 on lists of source domains --------------------------------------------------
    def _domains(self, domains: Sequence[Domain]) -> list[Domain]:
        if len(domains) == 0:
            raise UserError("pass at least one source domain as (x, y)")
        out = []
        for i, d in enumerate(domains):
            if not (isinstance(d, (tuple, list)) and len(d) == 2):
                raise UserError(f"source domain {i} must be an (x, y) pair of tensors")
            x, y = d
            check_batch(x, f"domain {i} images", self.input_shape)
            if not isinstance(y, torch.Tensor) or y.shape != x.shape[:1] or y.dtype != torch.long:
                raise UserError(f"domain {i} labels must be an int64 tensor with one label per image")
            if self.input_shape is None:
                self.input_shape = tuple(x.shape[1:])
            out.append((x, y))
        return out

    def _fit(self, module: nn.Module, loss_fn: Callable, n: int, epochs: int, lr: float, seed: int, progress=None,
             desc="", val: Sequence[Domain] | None = None) -> dict:
        """Adam on `module`; with `val` and `config.patience > 0`, early stopping on `val` accuracy.

        Early stopping keeps the weights (and BN statistics) of the best epoch and stops after
        `patience` epochs without a better one; returns {"epochs": run, "best_epoch", "val_acc"}.
        """
        opt = torch.optim.Adam(module.parameters(), lr=lr)
        stop = val is not None and self.config.patience > 0
        best, best_state, best_epoch, run = -1.0, None, 0, 0
        for epoch in range(epochs):
            module.train()
            chunks = batches(n, self.config.batch_size, seed=seed * 1000 + epoch)
            for b in (progress(chunks, desc=f"{desc} {epoch + 1}/{epochs}") if progress else chunks):
                loss = loss_fn(b)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            run = epoch + 1
            if stop:
                acc = _val_accuracy(module, val, self.device)
                if acc > best:
                    best, best_epoch = acc, run
                    best_state = {k: v.detach().clone() for k, v in module.state_dict().items()}
                elif run - best_epoch >= self.config.patience:
                    break
        if best_state is not None:
            module.load_state_dict(best_state)
        module.eval()
        return {"epochs": run, "best_epoch": best_epoch if stop else run,
                "val_acc": best if stop else _val_accuracy(module, val, self.device) if val else float("nan")}

    def pretrain_student(self, domains: Sequence[Domain], seed: int = 0, progress=None,
                         val: Sequence[Domain] | None = None) -> MetaDMoE:
        """Stage 3: ERM of the student on the union of all source domains (BN in train mode).

        With `val` (source validation (x, y) pairs) and `config.patience > 0`: early stopping on
        their pooled accuracy. What happened is in `self.fit_log["student"]`.
        """
        domains = self._domains(domains)
        x = torch.cat([d[0] for d in domains])
        y = torch.cat([d[1] for d in domains])
        dev, s = self.device, self.student
        s.train()

        def loss(b):
            return F.cross_entropy(s.head(s.features(x[b].to(dev))), y[b].to(dev))

        self.fit_log["student"] = self._fit(s, loss, len(x), self.config.student_epochs, self.config.student_lr,
                                            seed, progress, "student epoch", val)
        self.student_ready.fill_(True)
        return self

    def train_experts(self, domains: Sequence[Domain], seed: int = 0, progress=None,
                      val: Sequence[Domain] | None = None) -> MetaDMoE:
        """Stage 1: cross-entropy training of each expert on its domains (per `groups`), then freeze it.

        With `config.expert_init == "student"` each expert starts from the student's current weights.
        With `val` (one (x, y) per source domain) and `config.patience > 0` each expert stops early on
        the accuracy of its own domains' validation data (`self.fit_log["expert<k>"]`).
        """
        if self.config.expert_init == "student" and not bool(self.student_ready):
            raise UserError("train_experts starts every expert from the student (expert_init='student'), but the "
                            "student is untrained: call pretrain_student(domains) first, pass "
                            "MetaDMoE(..., student_pretrained=True) for a student trained elsewhere, or set "
                            "MetaDMoEConfig(expert_init='scratch')")
        domains = self._domains(domains)
        if len(domains) != len(self.groups):
            raise UserError(f"got {len(domains)} source domains but groups cover {len(self.groups)}; "
                            "pass groups=[expert index per domain] to MetaDMoE")
        for k, e in enumerate(self.experts):
            mine = [d for d, g in zip(domains, self.groups) if g == k]
            if not mine:
                raise UserError(f"expert {k} has no source domain in groups={self.groups}")
            if self.config.expert_init == "student":
                try:
                    e.load_state_dict(self.student.state_dict())
                except RuntimeError as err:
                    raise UserError("expert_init='student' needs experts of the student's architecture; "
                                    "use MetaDMoEConfig(expert_init='scratch')") from err
            x, y = torch.cat([d[0] for d in mine]), torch.cat([d[1] for d in mine])
            dev = self.device
            e.train()
            for p in e.parameters():
                p.requires_grad_(True)

            def loss(b, e=e, x=x, y=y, dev=dev):
                return F.cross_entropy(e.head(e.features(x[b].to(dev))), y[b].to(dev))

            mine_val = [v for v, g in zip(val, self.groups) if g == k] if val is not None else None
            self.fit_log[f"expert{k}"] = self._fit(e, loss, len(x), self.config.expert_epochs, self.config.expert_lr,
                                                   seed * 100 + k, progress, f"expert {k} epoch", mine_val)
            for p in e.parameters():
                p.requires_grad_(False)  # frozen feature extractors from now on
        return self

    def pretrain_aggregator(self, domains: Sequence[Domain], seed: int = 0, progress=None) -> MetaDMoE:
        """Stage 2: cross-entropy pre-training of the aggregator (+ its head) on all experts' features."""
        if self.aggregator is None or self.config.teacher != "aggregator":
            return self
        if self.aggregator.classifier is None:
            raise UserError("pretrain_aggregator needs Aggregator(num_classes=...) for its pre-training head")
        domains = self._domains(domains)
        x = torch.cat([d[0] for d in domains])
        y = torch.cat([d[1] for d in domains]).to(self.device)
        # experts are frozen: compute their tokens once instead of every epoch
        tokens = torch.cat([self.expert_tokens(x[b].to(self.device)) for b in torch.arange(len(x)).split(512)])
        a = self.aggregator
        a.train()

        def loss(b):
            return F.cross_entropy(a(tokens[b]), y[b])

        self._fit(a, loss, len(x), self.config.aggregator_epochs, self.config.aggregator_lr, seed,
                  progress, "aggregator epoch")
        return self

    def episodes(self, domains: Sequence[Domain], epoch: int, seed: int = 0):
        """Yield (support_x, query_x, query_y, domain) for one meta-epoch; a pure function of (seed, epoch)."""
        cfg = self.config
        g = torch.Generator().manual_seed(seed * 7919 + epoch)
        need = cfg.support_size + cfg.query_size
        for i, (x, _) in enumerate(domains):
            if len(x) < need:
                raise UserError(f"source domain {i} has {len(x)} images; an episode needs support_size + "
                                f"query_size = {need}")
        for _ in range(cfg.episodes_per_epoch):
            d = int(torch.randint(len(domains), (1,), generator=g))
            x, y = domains[d]
            idx = torch.randperm(len(x), generator=g)[:need]
            s, q = idx[: cfg.support_size], idx[cfg.support_size:]
            dev = self.device
            yield x[s].to(dev), x[q].to(dev), y[q].to(dev), d

    def meta_train(self, domains: Sequence[Domain], seed: int = 0, progress=None, start_epoch: int = 0,
                   optimizers=None, on_epoch_end: Callable | None = None) -> list[dict]:
        """Stage 4: `meta_epochs` epochs of one-domain episodes; returns per-epoch mean losses.

        `on_epoch_end(epoch, optimizers)` may checkpoint or select; resume with `start_epoch` and the
        saved optimizers.
        """
        domains = self._domains(domains)
        if len(domains) != len(self.groups):
            raise UserError(f"got {len(domains)} source domains but groups cover {len(self.groups)}")
        cfg = self.config
        for e in self.experts:
            for p in e.parameters():
                p.requires_grad_(False)
        if optimizers is None:
            optimizers = self.meta_optimizers(cfg.lr_decay ** start_epoch)
        for epoch in range(start_epoch, cfg.meta_epochs):
            eps = self.episodes(domains, epoch, seed)
            rows = [self.meta_step(*ep, optimizers) for ep in (progress(eps, desc=f"meta epoch {epoch + 1}",
                                                                       total=cfg.episodes_per_epoch)
                                                             if progress else eps)]
            summary = {"epoch": epoch + 1, **{k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}}
            self.history.append(summary)
            for i in range(0, len(rows), cfg.log_every):
                block = rows[i: i + cfg.log_every]
                self.curve.append({"episode": epoch * cfg.episodes_per_epoch + i + len(block),
                                   **{k: sum(r[k] for r in block) / len(block) for k in block[0]}})
            for o in optimizers:
                for group in o.param_groups:
                    group["lr"] *= cfg.lr_decay
            if on_epoch_end is not None:
                on_epoch_end(epoch, optimizers)
        return self.history
