"""EMoE: Emergent Mixture-of-Experts (Qiu et al., arXiv 2310.10908, NAACL 2024).

    from transferlab.emoe import EMoEConfig, convert, revert
    model = convert(model, EMoEConfig(num_experts=16, top_k=4, layers=[-2]))   # in place
    ...fine-tune as usual...
    save_pretrained(model, "out")    # transferlab_config.json + model.safetensors
    revert(model)   # a dense model again (the paper's EMoE2Dense serving path), in place
"""

import warnings

from .adapters import Adapter, register_adapter, supported_architectures
from .cluster import balanced_kmeans, mean_cosine_to_centroid
from .config import EMoEConfig
from .layer import EMoEMixin, avg_k_gate
from .model import (
    aux_loss,
    convert,
    emoe_config,
    emoe_layers,
    expert_load,
    from_pretrained,
    is_converted,
    revert,
    save_pretrained,
)

__all__ = ["EMoEConfig", "convert", "revert", "save_pretrained", "from_pretrained", "is_converted",
           "emoe_layers", "emoe_config", "aux_loss", "expert_load", "avg_k_gate", "balanced_kmeans",
           "mean_cosine_to_centroid", "Adapter", "EMoEMixin", "register_adapter", "supported_architectures"]

_DEPRECATED = {"convert_to_emoe": ("convert", convert), "revert_emoe": ("revert", revert)}


def __getattr__(name):
    if name in _DEPRECATED:
        new, fn = _DEPRECATED[name]
        warnings.warn(f"transferlab.emoe.{name} is deprecated; use transferlab.emoe.{new}", DeprecationWarning,
                      stacklevel=2)
        return fn
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
