"""`EMoEConfig`: how a dense FFN is split into emergent experts and routed.

Paper: Qiu et al., "Unlocking Emergent Modularity in Large Language Models" (arXiv 2310.10908,
NAACL 2024). The defaults follow the paper's method (§3 "Emergent MoE"): exactly balanced k-means
on L2-normalised FFN keys, avg-k gate, top-k with combine weight 1, frozen gate recomputed from the
live keys. Everything else is an ablation or a control and is off by default.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..core.config import field
from ..core.errors import UserError
from .kernels import IMPLS

GATES = ("avg-k", "learned")
SPLITS = ("balanced-kmeans", "random", "contiguous")
SELECTS = ("top-k", "bottom-k")
DROPOUT_POSITIONS = ("pre", "post")
CLUSTER_SOURCES = ("gate", "up")


@dataclass(frozen=True)
class EMoEConfig:
    """EMoE settings (paper §3; official defaults in the spec, §3 table).

    Paper guidance: N=64, k=16 (k/N = 1/4) on the last even layer of BERT-base; ViT-S N=24, k=4 on
    layers 8 and 10 of 12; Llama-2-7B N=64, k=16. k/N between 1/4 and 1/2 works.

    The four "official extras" (`aux_loss_weight`, `gate_noise`, `capacity_factor`,
    `expert_dropout`) are what the official BERT/GPT-2/ViT code (built on Tutel) also does. They are
    regularisers the dense baseline does not get, so turning them on **confounds** a comparison with
    dense; they exist for reproduction only and are off by default.
    """

    num_experts: int = field(16, "N: experts per converted FFN; must divide the FFN width d_ff")
    top_k: int = field(4, "k: experts used per token, 1..num_experts (k == N reproduces the dense FFN)")
    layers: tuple[int, ...] | str = field(
        (-2,), "FFN layers to convert: indices into the model's FFN list (negative counts from the end) or 'all'")
    gate: str = field("avg-k", "avg-k: frozen mean-of-keys gate, weight 1 (paper); learned: EMoE-learn ablation "
                      "(Tutel's cosine router, random init, top-k softmax weights renormalised to sum 1)")
    split: str = field("balanced-kmeans", "how neurons are grouped: balanced-kmeans (paper), random or "
                       "contiguous (controls: no emergent structure)")
    select: str = field("top-k", "top-k (paper) or bottom-k (negative control: the least activated experts)")
    seed: int = field(0, "seed of the clustering (k-means++ init) and of the random split")
    cluster_source: str = field("gate", "gated FFNs (Llama): cluster and score on gate_proj rows (EMoE) or "
                                "up_proj rows (LLaMA-MoE's choice)")
    kmeans_n_init: int = field(4, "k-means restarts; the best mean cosine to the centroid is kept")
    kmeans_max_iter: int = field(60, "Lloyd iterations per restart (stops early when labels are stable)")
    impl: str = field("auto", "execution path passed to kernels.expert_ffn ('auto', 'masked', ...)")
    # --- official-code extras: confound the comparison with dense, all off by default ---
    aux_loss_weight: float = field(0.0, "Tutel load_importance_loss weight (official 0.01; needs gate_noise > 0); "
                                   "add `emoe.aux_loss(model)` to your loss. CONFOUND: off by default")
    gate_noise: float = field(0.0, "training-time gate noise N(0,1)*gate_noise/N (official 1.0). "
                              "CONFOUND: off by default")
    capacity_factor: float | None = field(None, "None = dropless; 1.5 = Tutel: capacity per expert "
                                          "k*floor(cf*ceil(T/N)), batch-prioritised (first choices before second "
                                          "choices, tokens by best score); overflow pairs dropped. CONFOUND")
    expert_dropout: float = field(0.0, "extra dropout on expert activations (official 0.1). CONFOUND: the "
                                  "dense baseline has none; use the dense+dropout control")
    expert_dropout_position: str = field("pre", "pre = dropout before the activation (BERT/GPT-2 official), "
                                         "post = after (ViT official)")

    def __post_init__(self):
        def choose(name, value, allowed):
            if value not in allowed:
                raise UserError(f"EMoEConfig.{name}={value!r}: choose one of {', '.join(allowed)}")

        choose("gate", self.gate, GATES)
        choose("split", self.split, SPLITS)
        choose("select", self.select, SELECTS)
        choose("cluster_source", self.cluster_source, CLUSTER_SOURCES)
        choose("expert_dropout_position", self.expert_dropout_position, DROPOUT_POSITIONS)
        choose("impl", self.impl, IMPLS)
        if isinstance(self.layers, list):
            object.__setattr__(self, "layers", tuple(self.layers))
        if isinstance(self.layers, str) and self.layers != "all":
            raise UserError(f"EMoEConfig.layers={self.layers!r}: give a list of layer indices or 'all'")
        if isinstance(self.layers, tuple) and (not self.layers or not all(isinstance(i, int) for i in self.layers)):
            raise UserError(f"EMoEConfig.layers={self.layers!r}: give at least one integer layer index, or 'all'")
        if not isinstance(self.num_experts, int) or self.num_experts < 1:
            raise UserError(f"EMoEConfig.num_experts={self.num_experts!r} must be a positive integer")
        if not isinstance(self.top_k, int) or not 1 <= self.top_k <= self.num_experts:
            raise UserError(f"EMoEConfig.top_k={self.top_k!r} must lie between 1 and num_experts={self.num_experts}")
        if self.kmeans_n_init < 1 or self.kmeans_max_iter < 1:
            raise UserError("EMoEConfig.kmeans_n_init and kmeans_max_iter must be at least 1")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise UserError(f"EMoEConfig.capacity_factor={self.capacity_factor} must be > 0, or None for dropless")
        if not 0.0 <= self.expert_dropout < 1.0:
            raise UserError(f"EMoEConfig.expert_dropout={self.expert_dropout} must lie in [0, 1)")
        if self.gate_noise < 0 or self.aux_loss_weight < 0:
            raise UserError("EMoEConfig.gate_noise and aux_loss_weight must be >= 0")
        if self.aux_loss_weight > 0 and self.gate_noise == 0:
            raise UserError("EMoEConfig.aux_loss_weight > 0 needs gate_noise > 0: Tutel's load loss is smoothed by "
                            "the gate noise (official: gate_noise=1.0)")

    def to_dict(self) -> dict:
        """JSON-ready dict of every field (layers as a list or 'all')."""
        d = dataclasses.asdict(self)
        d["layers"] = list(self.layers) if isinstance(self.layers, tuple) else self.layers
        return d

    @classmethod
    def from_dict(cls, d: dict) -> EMoEConfig:
        """Inverse of to_dict; unknown keys are refused."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise UserError(f"EMoEConfig.from_dict: unknown keys {sorted(unknown)}; was it written by a newer "
                            "transferlab? Upgrade, or remove those keys")
        return cls(**d)  # __post_init__ turns a layers list into a tuple
