"""Image-text retrieval metrics (pure functions): R@1/5/10 in both directions and RSUM, in percent.

The image-text convention (COCO / Flickr30K; ALBEF, BLIP) is a *hit rate* (TREC success@K), not
TREC recall@K:
- image->text R@K: the fraction of images with *any* of their captions among the top K texts;
- text->image R@K: the fraction of captions whose image is among the top K images;
- RSUM: the sum of the six recalls.

Ties count against the query: an item is ranked below every non-relevant item with an equal score,
so a constant scorer gets no credit it did not earn.
"""

from __future__ import annotations

import torch

from ..core.errors import UserError


def first_hit_rank(sim: torch.Tensor, relevant: torch.Tensor) -> torch.Tensor:
    """0-based rank of each row's best relevant item: # non-relevant items scoring >= it."""
    if sim.shape != relevant.shape:
        raise UserError(f"relevance mask shape {tuple(relevant.shape)} != score shape {tuple(sim.shape)}")
    relevant = relevant.bool()
    if not relevant.any(1).all():
        raise UserError("every query needs at least one relevant item")
    best = sim.masked_fill(~relevant, float("-inf")).max(1, keepdim=True).values
    return ((sim >= best) & ~relevant).sum(1)


def recall_at_k(ranks: torch.Tensor, ks=(1, 5, 10)) -> dict[int, float]:
    return {k: 100.0 * (ranks < k).float().mean().item() for k in ks}


def retrieval_metrics(sim: torch.Tensor, text_to_image: torch.Tensor, ks=(1, 5, 10)) -> dict[str, float]:
    """R@K for image->text (i2t) and text->image (t2i), and RSUM.

    Args:
        sim: [n_images, n_texts] scores (higher = more similar).
        text_to_image: [n_texts] long, the image index of each text (several texts per image allowed).
    """
    if sim.dim() != 2:
        raise UserError(f"sim must be [n_images, n_texts], got shape {tuple(sim.shape)}")
    text_to_image = torch.as_tensor(text_to_image, dtype=torch.long, device=sim.device)
    if text_to_image.shape != (sim.shape[1],):
        raise UserError(f"text_to_image must have one entry per text ({sim.shape[1]}), "
                        f"got {tuple(text_to_image.shape)}")
    if text_to_image.min() < 0 or text_to_image.max() >= sim.shape[0]:
        raise UserError("text_to_image has an image index outside [0, n_images)")
    sim = sim.float()
    rel = text_to_image[None, :] == torch.arange(sim.shape[0], device=sim.device)[:, None]  # [I, T]
    out = {}
    for k, v in recall_at_k(first_hit_rank(sim, rel), ks).items():
        out[f"i2t_R@{k}"] = v
    for k, v in recall_at_k(first_hit_rank(sim.t(), rel.t()), ks).items():
        out[f"t2i_R@{k}"] = v
    out["RSUM"] = sum(out.values())
    return out
