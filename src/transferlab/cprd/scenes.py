"""Fashion-MNIST "scenes": 2x2 grids of real clothing images with templated captions, and their models.

A scene puts four Fashion-MNIST items at top-left, top-right, bottom-left, bottom-right. Captions
name the items and their positions, from several paraphrase templates (disclosed as templated:
no image-caption corpus is available offline). Scenes come in *families*: a base scene and
variants that differ from it by one item or by two swapped positions -- the hard negatives.

Models (all small enough for a CPU):
- `ItemClassifier`: a CNN pre-trained on single items; its frozen features embed each 28x28 cell.
- `SceneCrossEncoder` (teacher): ALBEF-style -- a caption encoder, then joint fusion layers in which
  [CLS] and the 4 image-patch tokens attend over themselves and the caption tokens; [CLS] -> image-text
  matching (ITM) logit. Reconstructed choice: one patch per grid cell (patch size 28), so it trains
  in a minute on a CPU.
- `SceneImageTower`, `SceneTextTower` (student): image tower = MLP over the cells' features in grid
  order; text tower = a small transformer, mean-pooled; both project to a low-dimensional embedding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
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


class FusionLayer(nn.Module):
    """Pre-LN joint attention: the image-side tokens attend over themselves *and* the caption tokens.

    Only the [CLS] + patch tokens are updated (the caption tokens come contextualised from the text
    encoder), which keeps the per-pair cost at 5 query tokens -- ALBEF-style fusion, sized for a CPU.
    """

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.n1, self.n2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ff = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, q, txt, txt_pad):
        kv = torch.cat([self.n1(q), txt], 1)
        pad = torch.cat([torch.zeros(q.shape[:2], dtype=torch.bool, device=q.device), txt_pad], 1)
        q = q + self.attn(self.n1(q), kv, kv, key_padding_mask=pad, need_weights=False)[0]
        return q + self.ff(self.n2(q))


class SceneCrossEncoder(nn.Module):
    """Teacher: caption encoder, then joint fusion layers over [CLS] + 4 image-patch tokens + caption tokens.

    Each patch is one grid cell, embedded from its item features (reconstructed: patch size 28).
    The [CLS] output gives the image-text matching (ITM) logit.
    """

    def __init__(self, feat_dim: int = 64, d_model: int = 64, text_layers: int = 2, fusion_layers: int = 2,
                 heads: int = 4):
        super().__init__()
        self.patch = nn.Linear(feat_dim, d_model)
        self.img_pos = nn.Parameter(torch.randn(4, d_model) * 0.02)
        self.cls = nn.Parameter(torch.randn(1, 1, d_model) * 0.02)
        self.tok = nn.Embedding(len(VOCAB), d_model, padding_idx=PAD)
        self.txt_pos = nn.Parameter(torch.randn(MAX_LEN, d_model) * 0.02)
        self.text = _encoder(d_model, text_layers, heads)
        self.text_norm = nn.LayerNorm(d_model)
        self.fusion = nn.ModuleList(FusionLayer(d_model, heads) for _ in range(fusion_layers))
        self.head = nn.Sequential(nn.LayerNorm(d_model), nn.Linear(d_model, 1))
        # ALBEF trains unimodal ITC embeddings next to ITM; their cosine is added to the ITM logit
        # (the "ITM + ITC" score of BLIP-2, LAVIS#645) -- it makes the teacher learn much faster
        self.itc_img = nn.Linear(4 * d_model, d_model)
        self.itc_txt = nn.Linear(d_model, d_model)
        self.itc_scale = nn.Parameter(torch.tensor(5.0))

    def image_tokens(self, cell_feats: torch.Tensor) -> torch.Tensor:
        """[CLS] + patch tokens of each image, computed once and reused for every caption it is paired with."""
        x = self.patch(cell_feats) + self.img_pos
        return torch.cat([self.cls.expand(len(x), -1, -1), x], 1)

    def text_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Contextualised caption tokens, computed once per caption."""
        h = self.text(self.tok(tokens) + self.txt_pos[: tokens.shape[1]], src_key_padding_mask=tokens == PAD)
        return self.text_norm(h)

    def itc_embed(self, img_tok, txt_tok, tokens) -> tuple[torch.Tensor, torch.Tensor]:
        """L2-normalised unimodal embeddings (for the ITC loss and the ITC part of the score)."""
        keep = (tokens != PAD)[..., None]
        zi = self.itc_img(img_tok[:, 1:].flatten(1))
        zt = self.itc_txt((txt_tok * keep).sum(1) / keep.sum(1))
        return F.normalize(zi, dim=-1), F.normalize(zt, dim=-1)

    def fuse(self, img_tok, txt_tok, tokens) -> torch.Tensor:
        """Matching logits of aligned pairs: [n, 5, d], [n, L, d], [n, L] -> [n] (ITM + scaled ITC cosine)."""
        q, pad = img_tok, tokens == PAD
        for layer in self.fusion:
            q = layer(q, txt_tok, pad)
        zi, zt = self.itc_embed(img_tok, txt_tok, tokens)
        return self.head(q[:, 0]).squeeze(-1) + self.itc_scale * (zi * zt).sum(-1)

    def forward(self, cell_feats, tokens):
        return self.fuse(self.image_tokens(cell_feats), self.text_tokens(tokens), tokens)

    def score_index(self, cell_feats, tokens, rows, cols) -> torch.Tensor:
        """Logits for pairs (image rows[i], caption cols[i]); each image and caption is encoded once."""
        return self.fuse(self.image_tokens(cell_feats)[rows], self.text_tokens(tokens)[cols], tokens[cols])

    @torch.no_grad()
    def score_pairs(self, cell_feats, tokens, rows, cols, chunk: int = 8192) -> torch.Tensor:
        """No-grad `score_index` in chunks: the teacher protocol of DualEncoderTrainer."""
        img, txt = self.image_tokens(cell_feats), self.text_tokens(tokens)
        out = [self.fuse(img[rows[i:i + chunk]], txt[cols[i:i + chunk]], tokens[cols[i:i + chunk]])
               for i in range(0, len(rows), chunk)]
        return torch.cat(out) if out else img.new_zeros(0)
