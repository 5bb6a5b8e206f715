"""`ClassGate`: the fixed class -> tailor assignment, and the hook that routes a model's batch through it.

KIND's gate "relies on discrete class labels for component assignment" (restated in DivControl
§3.2); the exact rule is the paper's Algorithm 1, which is not in our sources, so the rule here is
[reconstructed] and configurable: disjoint blocks of k tailors per class, or a fixed random k-subset.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from ..core.errors import UserError
from .layer import GateContext


def gate_table(num_classes: int, n_tailor: int, k_active: int | None, assignment: str = "block",
               seed: int = 0, gate: bool = True, null_class: str = "learngene_only") -> torch.Tensor:
    """{0,1} table of shape (num_classes + 1, n_tailor); the last row is the null (CFG) label.

    With `gate=False` every row is all ones (`null_class` does not apply).
    """
    if num_classes < 1:
        raise UserError(f"the class gate needs at least one class, got {num_classes}")
    k = n_tailor // num_classes if k_active is None else k_active
    if not 0 <= k <= n_tailor:
        raise UserError(f"k_active={k} must be between 0 and n_tailor={n_tailor}")
    if null_class not in ("learngene_only", "all_tailors"):
        raise UserError(f"null_class must be 'learngene_only' or 'all_tailors', got {null_class!r}")
    table = torch.zeros(num_classes + 1, n_tailor)
    if not gate:
        # no gate at all: every label, the null label included, uses every tailor, so no sample trains
        # the learngenes alone (no diversion of any kind)
        table[:] = 1.0
        return table
    if assignment == "block":
        for c in range(num_classes):  # wraps around (overlapping blocks) only when classes * k > n_tailor
            table[c, [(c * k + j) % n_tailor for j in range(k)]] = 1.0
    elif assignment == "random":
        g = torch.Generator().manual_seed(seed)
        for c in range(num_classes):
            table[c, torch.randperm(n_tailor, generator=g)[:k]] = 1.0
    else:
        raise UserError(f"gate assignment must be 'block' or 'random', got {assignment!r}")
    if null_class == "all_tailors":
        table[num_classes] = 1.0
    return table


class ClassGate(nn.Module):
    """Maps class labels to tailor masks and, hooked on a model, sets the masks before each forward.

    Labels 0..num_classes-1 are classes; `num_classes` is the null label (learngenes only by default).
    Any other label raises a `UserError`. After `transferlab.kind.merge(model, c)` only label c (the
    class the dense weights were materialised for) is accepted.
    """

    def __init__(self, num_classes: int, n_tailor: int, k_active: int | None = None, assignment: str = "block",
                 seed: int = 0, gate: bool = True, null_class: str = "learngene_only"):
        super().__init__()
        self.ctx = GateContext()
        self.label_arg: str | None = None
        self.label_pos: int | None = None
        self.merged_class: int | None = None
        self.config: dict | None = None  # the KindConfig.to_dict() of `convert`, for save_pretrained
        self.register_buffer("table", gate_table(num_classes, n_tailor, k_active, assignment, seed, gate,
                                                 null_class))
        self.settings = dict(k_active=k_active, assignment=assignment, seed=seed, gate=gate, null_class=null_class)

    @property
    def num_classes(self) -> int:
        return self.table.shape[0] - 1

    @property
    def n_tailor(self) -> int:
        return self.table.shape[1]

    def reset(self, num_classes: int, n_tailor: int | None = None, **settings) -> None:
        """A new table (e.g. for the new classes of a transfer task); unspecified settings are kept."""
        self.settings.update({k: v for k, v in settings.items() if v is not None or k == "k_active"})
        n = self.n_tailor if n_tailor is None else n_tailor
        self.table = gate_table(num_classes, n, **self.settings).to(self.table.device)

    def mask(self, y: torch.Tensor) -> torch.Tensor:
        """(B, n_tailor) float mask for labels y; raises on labels outside 0..num_classes."""
        y = torch.as_tensor(y, device=self.table.device)
        if y.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise UserError(f"class labels must be integers, got dtype {y.dtype}")
        y = y.reshape(-1).long()
        if len(y) and (int(y.min()) < 0 or int(y.max()) > self.num_classes):
            bad = y[(y < 0) | (y > self.num_classes)][0].item()
            raise UserError(f"class id {bad} is outside the gate (classes 0..{self.num_classes - 1}, null label "
                            f"{self.num_classes}); call transferlab.kind.transfer(model, new_classes) first")
        if self.merged_class is not None and bool((y != self.merged_class).any()):
            raise UserError(f"this model was merged for class {self.merged_class} only; got labels "
                            f"{sorted(set(y.tolist()))}. Merge once per class, or use the unmerged model")
        return self.table[y]

    def route(self, y: torch.Tensor) -> None:
        """Set the shared context to the distinct masks of this batch."""
        m = self.mask(y)
        masks, inverse = torch.unique(m, dim=0, return_inverse=True)
        self.ctx.set(masks, inverse)

    # ---- hooks installed by `convert` ---------------------------------------------------------
    def attach(self, model: nn.Module, label_arg: str | None = None) -> None:
        params = list(inspect.signature(model.forward).parameters)
        if label_arg is None:
            label_arg = next((n for n in ("y", "class_labels", "labels") if n in params), None)
        if label_arg is None or label_arg not in params:
            raise UserError(f"cannot find the class-label argument of {type(model).__name__}.forward{params}; "
                            "set KindConfig.label_arg to its name")
        self.label_arg, self.label_pos = label_arg, params.index(label_arg)
        model.register_forward_pre_hook(self._pre_hook, with_kwargs=True)
        model.register_forward_hook(self._post_hook)

    def _pre_hook(self, module, args, kwargs):
        if self.label_arg in kwargs:
            y = kwargs[self.label_arg]
        elif self.label_pos < len(args):
            y = args[self.label_pos]
        else:
            y = None
        if y is None:
            raise UserError(f"{type(module).__name__} has KIND layers and needs class labels "
                            f"(argument {self.label_arg!r}) in every forward call")
        self.route(y)
        return None

    def _post_hook(self, module, args, output):
        self.ctx.clear()  # no stale routing for a layer called directly later
        return None
