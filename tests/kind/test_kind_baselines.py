"""The dense-model controls of `kind-fmnist`: class-gated LoRA and SVDiff."""

import torch

from transferlab.kind.baselines import GatedLoRALinear, apply_gated_lora, apply_lora
from transferlab.nn.dit import DiT


def _dit(num_classes=4):
    torch.manual_seed(0)
    m = DiT(image_size=8, patch=4, width=16, depth=1, heads=2, num_classes=num_classes)
    with torch.no_grad():  # adaLN-Zero starts at a zero output; give the blocks something to do
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


def test_gated_lora_routes_rank_components_by_class_and_null_is_the_base_model():
    base = _dit()
    model = apply_gated_lora(_dit(), rank=8)  # 4 classes -> 2 components each, disjoint blocks
    layers = [m for m in model.modules() if isinstance(m, GatedLoRALinear)]
    assert layers and all(layer.rank == 8 for layer in layers)
    with torch.no_grad():
        for layer in layers:
            layer.B.normal_()
    x, t = torch.randn(5, 1, 8, 8), torch.tensor([3, 50, 7, 9, 11])
    y = torch.tensor([0, 1, 2, 3, 4])  # 4 = null label
    out = model(x, t, y)
    # null label: every component off, exactly the frozen dense model
    torch.testing.assert_close(out[4], base(x, t, y)[4], rtol=0, atol=1e-6)
    # class 0 owns components 0 and 1: changing component 5 leaves it unchanged, changes class 2
    with torch.no_grad():
        for layer in layers:
            layer.A[5].add_(1.0)
    out2 = model(x, t, y)
    torch.testing.assert_close(out2[0], out[0], rtol=0, atol=0)
    assert not torch.allclose(out2[2], out[2])
    # a mixed batch equals per-sample calls
    single = torch.cat([model(x[i:i + 1], t[i:i + 1], y[i:i + 1]) for i in range(5)])
    torch.testing.assert_close(out2, single, rtol=1e-5, atol=1e-6)


def test_gated_lora_has_lora_parameter_count_and_starts_at_the_base_model():
    plain, gated = apply_lora(_dit(), rank=8), apply_gated_lora(_dit(), rank=8)
    count = lambda m: sum(p.numel() for n, p in m.named_parameters() if n.endswith((".A", ".B")))  # noqa: E731
    assert count(plain) == count(gated) > 0
    x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([1, 2, 3]), torch.tensor([0, 1, 2])
    torch.testing.assert_close(gated(x, t, y), _dit()(x, t, y), rtol=0, atol=1e-6)  # B = 0 at the start
