"""CPRD: distil a cross-encoder's ranking of hard negatives into a dual encoder (Chen et al., CVPR 2024).

Library: `cprd_loss` (pure, vectorised), `CPRDLoss` (InfoNCE + λ·CPRD, both directions),
`mine_hard_negatives`, `DualEncoderTrainer`, `retrieval_metrics`, baselines (`KLDistillLoss`,
`MarginMSEDistillLoss`, `ListNetDistillLoss`) and `CPRDSentenceTransformerLoss`.
Experiments: `cprd-fmnist-scenes`, `cprd-wordnet`; benchmark: `cprd-loss`.
"""

from .config import CPRDConfig
from .loss import (
    cprd_loss,
    infonce_loss,
    kl_distill_loss,
    listnet_loss,
    margin_mse_loss,
    mine_hard_negatives,
    valid_prefix,  # noqa: F401 - kept importable; an internal validator, not part of the API
    valid_ranks,
)
from .metrics import retrieval_metrics
from .model import (
    LOSSES,
    ContrastiveDistillLoss,
    CPRDLoss,
    InfoNCELoss,
    KLDistillLoss,
    ListNetDistillLoss,
    MarginMSEDistillLoss,
    make_loss,
)
from .st_adapter import CPRDSentenceTransformerLoss
from .trainer import DualEncoder, DualEncoderTrainer

__all__ = ["CPRDConfig", "cprd_loss", "infonce_loss", "kl_distill_loss", "listnet_loss", "margin_mse_loss",
           "mine_hard_negatives", "valid_ranks", "retrieval_metrics", "LOSSES",
           "ContrastiveDistillLoss", "CPRDLoss", "InfoNCELoss", "KLDistillLoss", "ListNetDistillLoss",
           "MarginMSEDistillLoss", "make_loss", "CPRDSentenceTransformerLoss", "DualEncoder", "DualEncoderTrainer"]
