"""EMoE: Emergent Mixture-of-Experts (Qiu et al., arXiv 2310.10908, NAACL 2024).

    from transferlab.emoe import EMoEConfig, convert, revert
    model = convert(model, EMoEConfig(num_experts=16, top_k=4, layers=[-2]))   # in place
    ...fine-tune as usual...
    revert(model)   # a dense model again (the paper's EMoE2Dense serving path)
"""

from .adapters import Adapter, register_adapter, supported_architectures
from .cluster import balanced_kmeans, mean_cosine_to_centroid, split_permutation
from .config import EMoEConfig
from .layer import EMoEMixin, avg_k_gate
from .model import (
    apply_saved,
    aux_loss,
    convert,
    emoe_config,
    emoe_layers,
    expert_load,
    ffn_hosts,
    from_pretrained,
    is_converted,
    revert,
    save_pretrained,
)

convert_to_emoe = convert
revert_emoe = revert

__all__ = ["EMoEConfig", "convert", "revert", "convert_to_emoe", "revert_emoe", "Adapter", "register_adapter",
           "supported_architectures", "balanced_kmeans", "mean_cosine_to_centroid", "split_permutation",
           "EMoEMixin", "avg_k_gate", "aux_loss", "emoe_config", "emoe_layers", "expert_load", "ffn_hosts",
           "from_pretrained", "apply_saved", "is_converted", "save_pretrained"]
