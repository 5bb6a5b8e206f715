"""WordNet supersense classification data for `emoe-wordnet` (real text, offline).

Task: map a synset to its lexicographer file (39 noun/verb supersenses). Input "lemma: text".
Split by synset with a fixed split seed: validation and test synsets come only from synsets that
have usage examples; training uses the *definitions* of the remaining synsets, never examples.
In-domain test = test synsets' definitions; out-of-domain test = their usage-example sentences
(same labels, different genre of text).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from ..core.errors import UserError
from ..data import SUPERSENSES_39, load_wordnet


@dataclass(frozen=True)
class Split:
    texts: tuple[str, ...]
    labels: torch.Tensor


@dataclass(frozen=True)
class SupersenseData:
    train: Split
    val: Split
    test_id: Split
    test_ood: Split
    classes: tuple[str, ...]


def _text(s, body: str) -> str:
    return f"{s.lemmas[0]}: {body}"


@lru_cache(maxsize=4)
def supersense_data(n_train: int, n_val: int, n_test: int, split_seed: int = 0,
                    data_path: str | None = None) -> SupersenseData:
    syn = [s for s in load_wordnet(("n", "v"), data_path) if s.lexname in SUPERSENSES_39]
    cls = {c: i for i, c in enumerate(SUPERSENSES_39)}
    g = torch.Generator().manual_seed(split_seed)
    with_ex = [s for s in syn if s.examples]
    order = torch.randperm(len(with_ex), generator=g).tolist()
    if n_val + n_test > len(with_ex):
        raise UserError(f"n_val + n_test = {n_val + n_test} but only {len(with_ex)} synsets have usage examples; "
                        "lower n_val/n_test")
    val = [with_ex[i] for i in order[:n_val]]
    test = [with_ex[i] for i in order[n_val:n_val + n_test]]
    held = {s.id for s in val + test}
    pool = [s for s in syn if s.id not in held]
    if n_train > len(pool):
        raise UserError(f"n_train={n_train} but only {len(pool)} training synsets are available; lower n_train")
    pick = torch.randperm(len(pool), generator=g)[:n_train].tolist()
    train = [pool[i] for i in sorted(pick)]

    def split(items, examples: bool = False) -> Split:
        if examples:
            pairs = [(_text(s, e), cls[s.lexname]) for s in items for e in s.examples]
        else:
            pairs = [(_text(s, s.definition), cls[s.lexname]) for s in items]
        return Split(tuple(t for t, _ in pairs), torch.tensor([y for _, y in pairs], dtype=torch.long))

    return SupersenseData(split(train), split(val), split(test), split(test, examples=True), SUPERSENSES_39)


def accuracy_macro_f1(pred: torch.Tensor, y: torch.Tensor, num_classes: int) -> tuple[float, float]:
    """(accuracy %, macro-F1 % over the classes present in y or pred)."""
    acc = (pred == y).float().mean().item() * 100
    cm = torch.zeros(num_classes, num_classes, dtype=torch.long)
    cm.index_put_((y, pred), torch.ones_like(y), accumulate=True)
    tp = cm.diag().float()
    prec = tp / cm.sum(0).clamp_min(1)
    rec = tp / cm.sum(1).clamp_min(1)
    f1 = 2 * prec * rec / (prec + rec).clamp_min(1e-12)
    present = (cm.sum(0) + cm.sum(1)) > 0
    return acc, f1[present].mean().item() * 100
