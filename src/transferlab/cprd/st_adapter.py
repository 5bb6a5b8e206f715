"""CPRD as a sentence-transformers loss (the library is optional; nothing here imports it).

Data format, as for sentence-transformers' `MarginMSELoss`: columns (query, positive, candidate_1,
..., candidate_n), and a label per row = the teacher's scores [M(q, pos), M(q, cand_1), ..., M(q, cand_n)]
(e.g. `CrossEncoder.predict` on those pairs).

Where the negatives come from. CPRD mines the hard negatives with the *current* student. Inside a
sentence-transformers loss that can only be done among the candidates of the row: the loss receives
tokenised features, not texts, so it cannot call a cross-encoder on pairs it picks itself, and the
teacher scores must arrive as labels. Two ways to use it:

- offline (k=None): the n candidates are the student's hard negatives mined before training (e.g.
  `sentence_transformers.util.mine_hard_negatives` with the model being trained); all n are ranked.
  The negatives then reflect the student at mining time, not at each step: re-mine every epoch or so.
- online (k < n): give each query a wider pool of n candidates with their teacher scores (e.g. the
  student's top 32 mined once), and the loss re-mines, at every step, the *current* student's k most
  similar of them, and ranks only those -- the method's online mining restricted to that pool.

The loss is InfoNCE over in-batch candidates (every positive and candidate of the batch, like
`MultipleNegativesRankingLoss`) + weight x CPRD over each query's own mined candidates ordered by the
teacher (the in-batch candidates have no teacher score, so they are not ranked).

    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
    from transferlab.cprd import CPRDSentenceTransformerLoss
    model = SentenceTransformer(str(transferlab.data.minilm_path()))
    loss = CPRDSentenceTransformerLoss(model, weight=1.0, tau=0.05, k=8)  # rows carry 32 candidates
    SentenceTransformerTrainer(model=model, train_dataset=ds, loss=loss).train()
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import UserError
from .loss import infonce_loss, partial_ranking_nll


class CPRDSentenceTransformerLoss(nn.Module):
    """InfoNCE + weight·CPRD for a `SentenceTransformer` student; labels are teacher scores [B, 1 + n].

    Args:
        model: the SentenceTransformer (anything returning {"sentence_embedding": ...} when called).
        weight: λ, the CPRD weight (reconstructed default 1.0).
        tau: temperature on cosine similarities (reconstructed default 0.05 = scale 20, as
            MultipleNegativesRankingLoss).
        valid, valid_param: validity rule of the partial ranking (see `transferlab.cprd.loss.valid_ranks`);
            "below_positive" reads the positive's teacher score from the label's column 0.
        k: None ranks every candidate of the row (offline mining); an integer < n re-mines, at every
            step, the current student's k most similar candidates of the row (online mining).
        rank_reduction: "mean" or "sum" over a row's rank terms.
    """

    def __init__(self, model, weight: float = 1.0, tau: float = 0.05, valid: str = "all",
                 valid_param: float | None = None, k: int | None = None, rank_reduction: str = "mean"):
        super().__init__()
        if tau <= 0 or weight < 0:
            raise UserError(f"tau must be > 0 and weight >= 0, got tau={tau}, weight={weight}")
        if k is not None and (int(k) != k or k < 2):
            raise UserError(f"k must be None (rank every candidate) or an integer >= 2, got {k!r}")
        self.model, self.weight, self.tau = model, weight, tau
        self.valid, self.valid_param, self.k, self.rank_reduction = valid, valid_param, k, rank_reduction

    def embed(self, features: dict) -> torch.Tensor:
        return F.normalize(self.model(features)["sentence_embedding"], dim=-1)

    def forward(self, sentence_features: Iterable[dict], labels: torch.Tensor) -> torch.Tensor:
        embs = [self.embed(f) for f in sentence_features]
        return self.compute_loss_from_embeddings(embs, labels)

    def compute_loss_from_embeddings(self, embs: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        if len(embs) < 3:
            raise UserError("CPRDSentenceTransformerLoss needs columns (query, positive, negative_1, ...): "
                            f"got {len(embs)} column(s)")
        q, docs = embs[0], embs[1:]
        b, n = q.shape[0], len(docs) - 1
        if labels is None or tuple(labels.shape) != (b, n + 1):
            got = None if labels is None else tuple(labels.shape)
            raise UserError(f"labels must be the teacher scores [batch, 1 + negatives] = {(b, n + 1)}, got {got}")
        if torch.isnan(labels).any():
            raise UserError("labels (teacher scores) contain NaN")
        cand = torch.cat(docs, 0)  # [(1 + n) * B, d], column-major: all positives, then negative_1, ...
        sim = q @ cand.t()
        pos = torch.zeros_like(sim, dtype=torch.bool)
        pos[torch.arange(b), torch.arange(b)] = True
        nce = infonce_loss(sim, pos, self.tau)
        own = torch.stack([(q * d).sum(-1) for d in docs[1:]], 1)  # [B, n] the query's own candidates
        t = labels[:, 1:].to(own.device)
        if self.k is not None:
            if self.k > n:
                raise UserError(f"k={self.k} exceeds the {n} candidates per row; lower k or give more candidates")
            mined = own.detach().topk(self.k, dim=1).indices  # online: the current student's hardest
            own, t = own.gather(1, mined), t.gather(1, mined)
        cprd = partial_ranking_nll(own / self.tau, t, valid=self.valid, valid_param=self.valid_param,
                                   t_pos=labels[:, 0].to(own.device), rank_reduction=self.rank_reduction)
        return nce + self.weight * cprd

    def get_config_dict(self) -> dict:
        return {"weight": self.weight, "tau": self.tau, "valid": self.valid, "valid_param": self.valid_param,
                "k": self.k, "rank_reduction": self.rank_reduction}
