"""Meta-DMoE (Zhong et al., NeurIPS 2022): test-time adaptation by meta-distillation from domain experts.

    from transferlab.metadmoe import Aggregator, MetaDMoE, MetaDMoEConfig
    m = MetaDMoE(experts, Aggregator(dim=D, heads=4, num_classes=C), student, MetaDMoEConfig())
    m.pretrain_student(domains); m.train_experts(domains); m.pretrain_aggregator(domains); m.meta_train(domains)
    adapted = m.adapt(unlabeled_target_batch)   # stored weights unchanged
    logits = adapted.predict(x)
"""

from .aggregator import Aggregator
from .baselines import ERM, BNAdapt, Tent
from .config import MetaDMoEConfig
from .model import AdaptedStudent, MetaDMoE

__all__ = ["Aggregator", "MetaDMoE", "MetaDMoEConfig", "AdaptedStudent", "ERM", "BNAdapt", "Tent"]
