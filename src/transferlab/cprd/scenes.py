"""Fashion-MNIST "scenes": 2x2 grids of real clothing images with templated captions, and their models.

A scene puts four Fashion-MNIST items at top-left, top-right, bottom-left, bottom-right. Captions
name the items and their positions, from several paraphrase templates (disclosed as templated:
no image-caption corpus is available offline). Scenes come in *families*: a base scene and
variants that differ from it by one item or by two swapped positions -- the hard negatives.

Models (all small enough for a CPU):
- `ItemClassifier`: a CNN pre-trained on single items; its frozen features embed each 28x28 cell.
- `SceneCrossEncoder` (teacher): one joint transformer over the 4 image-patch tokens and the caption
  tokens, [CLS] -> image-text matching (ITM) logit. Reconstructed choice: one patch per grid cell
  (patch size 28) so that a 2-layer transformer trains in seconds.
- `SceneImageTower`, `SceneTextTower` (student): image tower = MLP over the cells' features in grid
  order; text tower = a small transformer, mean-pooled; both project to a low-dimensional embedding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..core.errors import UserError

NAMES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot")
# Paraphrase templates; {0..3} = top-left, top-right, bottom-left, bottom-right.
TEMPLATES = (
    "top left {0} top right {1} bottom left {2} bottom right {3}",
    "a {0} and a {1} on top , a {2} and a {3} below",
    "left column {0} above {2} , right column {1} above {3}",
    "bottom right {3} bottom left {2} top right {1} top left {0}",
    "upper row {0} then {1} , lower row {2} then {3}",
    "a {3} lower right , a {1} upper right , a {2} lower left , a {0} upper left",
)
PAD = 0
VOCAB = ("<pad>", "<cls>") + NAMES + tuple(sorted({w for t in TEMPLATES for w in t.split() if not w.startswith("{")}))
WORD = {w: i for i, w in enumerate(VOCAB)}
MAX_LEN = max(len(t.split()) for t in TEMPLATES)


def tokenize(classes, template: int) -> list[int]:
    words = TEMPLATES[template].format(*(NAMES[c] for c in classes)).split()
    ids = [WORD[w] for w in words]
    return ids + [PAD] * (MAX_LEN - len(ids))


@dataclass
class SceneSet:
    """Scenes (item image indices and classes), their captions, and family ids."""

    items: torch.Tensor      # [S, 4] indices into the image pool
    classes: torch.Tensor    # [S, 4] classes of those items
    family: torch.Tensor     # [S] family id (a base scene and its hard variants)
    tokens: torch.Tensor     # [S * n_captions, MAX_LEN] caption token ids
    text_scene: torch.Tensor  # [S * n_captions] scene of each caption

    def images(self, pool_feats: torch.Tensor, idx=None) -> torch.Tensor:
        """[n, 4, feat_dim] item features of the selected scenes' cells (grid order TL, TR, BL, BR)."""
        it = self.items if idx is None else self.items[idx]
        return pool_feats[it]

    def pixels(self, pool: torch.Tensor, idx=None) -> torch.Tensor:
        """[n, 56, 56] uint8 scene images (for display)."""
        it = self.items if idx is None else self.items[idx]
        cells = pool[it]
        return torch.cat([torch.cat([cells[:, 0], cells[:, 1]], 2), torch.cat([cells[:, 2], cells[:, 3]], 2)], 1)

    def __len__(self) -> int:
        return len(self.items)


def make_scenes(labels: torch.Tensor, n_families: int, family_size: int, n_captions: int,
                generator: torch.Generator, unique: bool = True) -> SceneSet:
    """Families of scenes built from an image pool with the given labels.

    Each family: a random base scene, then `family_size - 1` variants, each either replacing one item
    by an item of another class or swapping two items of different classes. With `unique`, no two
    scenes in the set have the same class layout (so every caption has exactly one correct scene).
    """
    if family_size < 1 or n_captions < 1 or n_captions > len(TEMPLATES):
        raise UserError(f"family_size >= 1 and 1 <= n_captions <= {len(TEMPLATES)} required")
    by_class = [(labels == c).nonzero().squeeze(1) for c in range(10)]
    if any(len(b) == 0 for b in by_class):
        raise UserError("the image pool needs every Fashion-MNIST class")

    def pick(c: int) -> int:
        b = by_class[c]
        return int(b[torch.randint(len(b), (1,), generator=generator)])

    seen: set = set()
    items, classes, family = [], [], []
    fam = 0
    tries = 0
    while fam < n_families:
        tries += 1
        if tries > 50 * n_families + 1000:
            raise UserError("could not build enough distinct scenes; lower n_families")
        base_c = torch.randint(10, (4,), generator=generator).tolist()
        group = [(base_c, [pick(c) for c in base_c])]
        while len(group) < family_size:
            c, it = list(base_c), list(group[0][1])
            if torch.rand((), generator=generator) < 0.5 and len(set(c)) > 1:
                while True:  # swap two positions holding different classes
                    i, j = torch.randperm(4, generator=generator)[:2].tolist()
                    if c[i] != c[j]:
                        break
                c[i], c[j], it[i], it[j] = c[j], c[i], it[j], it[i]
            else:  # replace one item by another class
                i = int(torch.randint(4, (1,), generator=generator))
                new = (c[i] + 1 + int(torch.randint(9, (1,), generator=generator))) % 10
                c[i], it[i] = new, pick(new)
            if all(tuple(c) != tuple(g[0]) for g in group):
                group.append((c, it))
        keys = [tuple(g[0]) for g in group]
        if unique and (any(k in seen for k in keys)):
            continue
        seen.update(keys)
        for c, it in group:
            items.append(it)
            classes.append(c)
            family.append(fam)
        fam += 1
    classes_t = torch.tensor(classes)
    tokens, text_scene = [], []
    for s, c in enumerate(classes):
        for t in torch.randperm(len(TEMPLATES), generator=generator)[:n_captions].tolist():
            tokens.append(tokenize(c, t))
            text_scene.append(s)
    return SceneSet(torch.tensor(items), classes_t, torch.tensor(family), torch.tensor(tokens),
                    torch.tensor(text_scene))


class ItemClassifier(nn.Module):
    """A small CNN pre-trained on single Fashion-MNIST items; its frozen features feed teacher and student.

    Reconstructed for CPU: the paper's towers start from pre-trained ViT/BERT; here both models start
    from the same pre-trained item encoder, so the arms differ only in how the scene-level model learns.
    """

    def __init__(self, feat_dim: int = 64, width: int = 16):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(2 * width * 49, feat_dim), nn.ReLU(),
        )
        self.head = nn.Linear(feat_dim, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:  # [n, 28, 28] float -> [n, feat_dim]
        return self.body(x.reshape(-1, 1, 28, 28))

    def forward(self, x):
        return self.head(self.features(x))


def _encoder(d: int, layers: int, heads: int) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True, norm_first=True)
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)


class SceneImageTower(nn.Module):
    """Student image tower: an MLP over the four cells' item features, in grid order."""

    def __init__(self, dim: int, feat_dim: int = 64, hidden: int = 128):
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(4 * feat_dim, hidden), nn.ReLU(), nn.Linear(hidden, dim))

    def forward(self, cell_feats):  # [n, 4, feat_dim]
        return self.proj(cell_feats.flatten(1))


class SceneTextTower(nn.Module):
    """Student text tower: a small transformer over caption tokens, mean-pooled."""

    def __init__(self, dim: int, d_model: int = 64, layers: int = 2, heads: int = 4):
        super().__init__()
        self.tok = nn.Embedding(len(VOCAB), d_model, padding_idx=PAD)
        self.pos = nn.Parameter(torch.randn(MAX_LEN, d_model) * 0.02)
        self.enc = _encoder(d_model, layers, heads)
        self.out = nn.Linear(d_model, dim)

    def forward(self, tokens):
        keep = tokens != PAD
        h = self.enc(self.tok(tokens) + self.pos[: tokens.shape[1]], src_key_padding_mask=~keep)
        h = (h * keep[..., None]).sum(1) / keep.sum(1, keepdim=True)
        return self.out(h)


class SceneCrossEncoder(nn.Module):
    """Teacher: [CLS] + 4 image-patch tokens + caption tokens through one joint transformer -> ITM logit.

    Each patch is one grid cell, embedded from its item features (reconstructed: patch size 28).
    """

    def __init__(self, feat_dim: int = 64, d_model: int = 64, layers: int = 2, heads: int = 4):
        super().__init__()
        self.patch = nn.Linear(feat_dim, d_model)
        self.tok = nn.Embedding(len(VOCAB), d_model, padding_idx=PAD)
        self.img_pos = nn.Parameter(torch.randn(4, d_model) * 0.02)
        self.txt_pos = nn.Parameter(torch.randn(MAX_LEN, d_model) * 0.02)
        self.cls = nn.Parameter(torch.randn(1, 1, d_model) * 0.02)
        self.enc = _encoder(d_model, layers, heads)
        self.head = nn.Linear(d_model, 1)

    def image_tokens(self, cell_feats: torch.Tensor) -> torch.Tensor:
        """Patch tokens of each image, computed once and reused for every caption it is paired with."""
        return self.patch(cell_feats) + self.img_pos

    def score_tokens(self, img_tok: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """ITM logits of aligned (image tokens, caption) pairs: [n, 4, d], [n, L] -> [n]."""
        n = tokens.shape[0]
        txt = self.tok(tokens) + self.txt_pos[: tokens.shape[1]]
        x = torch.cat([self.cls.expand(n, -1, -1), img_tok, txt], 1)
        pad = torch.cat([torch.zeros(n, 5, dtype=torch.bool, device=tokens.device), tokens == PAD], 1)
        return self.head(self.enc(x, src_key_padding_mask=pad)[:, 0]).squeeze(-1)

    def forward(self, cell_feats, tokens):
        return self.score_tokens(self.image_tokens(cell_feats), tokens)

    @torch.no_grad()
    def score_pairs(self, cell_feats, tokens, rows, cols, chunk: int = 4096) -> torch.Tensor:
        """Logits for pairs (image rows[i], caption cols[i]); the teacher protocol of DualEncoderTrainer."""
        img_tok = self.image_tokens(cell_feats)
        out = [self.score_tokens(img_tok[rows[i:i + chunk]], tokens[cols[i:i + chunk]])
               for i in range(0, len(rows), chunk)]
        return torch.cat(out) if out else img_tok.new_zeros(0)
