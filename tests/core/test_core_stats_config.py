import dataclasses
import math
from typing import Literal

import pytest

from transferlab.core.config import apply_overrides, config_hash, field
from transferlab.core.errors import UserError
from transferlab.core.stats import mean_ci, paired_diff, t_critical


@dataclasses.dataclass(frozen=True)
class Cfg:
    arms: tuple[str, ...] = field(("a", "b"), "arms")
    seeds: int = field(2, "seeds")
    lr: float = field(1e-3, "learning rate")
    flag: bool = field(False, "a flag")
    mode: Literal["x", "y"] = field("x", "mode")
    path: str | None = field(None, "optional path")


def test_mean_ci_matches_hand_computation():
    m, h, n = mean_ci([1.0, 2.0, 3.0])
    # sd = 1, se = 1/sqrt(3), t(2) = 4.303
    assert n == 3 and m == pytest.approx(2.0)
    assert h == pytest.approx(4.303 / math.sqrt(3), rel=1e-4)
    m1, h1, n1 = mean_ci([5.0])
    assert m1 == 5.0 and math.isnan(h1) and n1 == 1


def test_paired_diff_uses_common_seeds_only():
    a = {0: 10.0, 1: 12.0, 2: 11.0}
    b = {0: 9.0, 1: 10.0, 3: 100.0}
    m, h, n = paired_diff(a, b)
    assert n == 2 and m == pytest.approx(1.5)
    assert h == pytest.approx(t_critical(1) * 0.5, rel=1e-4)  # diffs 1, 2: sd 0.707, se 0.5


def test_overrides_parse_types():
    cfg = apply_overrides(Cfg(), ["lr=0.1", "flag=true", "mode=y", "arms=a", "path=none", "seeds=4"])
    assert cfg.lr == 0.1 and cfg.flag is True and cfg.mode == "y" and cfg.arms == ("a",)
    assert cfg.path is None and cfg.seeds == 4


@pytest.mark.parametrize("item, msg", [
    ("nope=1", "unknown config key 'nope'"),
    ("lr=fast", "expected float"),
    ("flag=maybe", "expected a boolean"),
    ("mode=z", "allowed values are x, y"),
    ("lr", "key=value"),
])
def test_bad_overrides_raise_user_error(item, msg):
    with pytest.raises(UserError, match=msg):
        apply_overrides(Cfg(), [item])


def test_config_hash_ignores_seeds_and_arms_but_not_values():
    assert config_hash(Cfg()) == config_hash(Cfg(seeds=9))
    assert config_hash(Cfg()) == config_hash(Cfg(arms=("b",)))
    assert config_hash(Cfg()) != config_hash(Cfg(lr=0.5))


@dataclasses.dataclass(frozen=True)
class Inner:
    top_k: int = field(2, "experts per token")
    num_experts: int = field(8, "experts")

    def __post_init__(self):
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k={self.top_k} exceeds num_experts={self.num_experts}")


@dataclasses.dataclass(frozen=True)
class Outer:
    arms: tuple[str, ...] = field(("a",), "arms")
    seeds: int = field(1, "seeds")
    method: Inner = field(Inner(), "the method's config")


def test_overrides_are_applied_in_one_step_in_any_order():
    # top_k=16 alone is invalid for num_experts=8; together with num_experts=32 it is valid in either order
    for items in (["method.top_k=16", "method.num_experts=32"], ["method.num_experts=32", "method.top_k=16"]):
        cfg = apply_overrides(Outer(), items)
        assert cfg.method == Inner(top_k=16, num_experts=32)
    with pytest.raises(UserError, match="exceeds num_experts"):
        apply_overrides(Outer(), ["method.top_k=16"])


def test_flat_alias_reaches_the_nested_config():
    assert apply_overrides(Outer(), ["top_k=4"]).method.top_k == 4
    with pytest.raises(UserError, match="unknown config key 'topk'"):
        apply_overrides(Outer(), ["topk=4"])


def test_cuber_split_overrides_are_order_independent():
    from transferlab.core.registry import get_experiment

    exp = get_experiment("cuber-split-fmnist")
    a = exp.make_config("quick", ["n_tasks=2", "classes_per_task=5"])
    b = exp.make_config("quick", ["classes_per_task=5", "n_tasks=2"])
    assert a == b and (a.n_tasks, a.classes_per_task) == (2, 5)


def test_minimal_detectable_effect_matches_the_formula_and_shrinks_with_seeds():
    from transferlab.core.stats import minimal_detectable_effect, verdict

    d = [1.0, -1.0, 1.0, -1.0, 1.0, -1.0, 1.0, -1.0, 1.0, -1.0]  # sd = 1.054, n = 10
    sd = math.sqrt(10 / 9)
    assert minimal_detectable_effect(d) == pytest.approx((2.262 + 0.883) * sd / math.sqrt(10), rel=1e-6)
    assert minimal_detectable_effect(d * 4) < minimal_detectable_effect(d)
    assert math.isnan(minimal_detectable_effect([1.0]))
    assert verdict(2.0, 1.0, 0.5) == "better" and verdict(-2.0, 1.0, 0.5) == "worse"
    assert verdict(-2.0, 1.0, 0.5, higher_is_better=False) == "better"
    assert verdict(0.2, 1.0, 1.4).startswith("no difference detected (MDE 1.4")


def test_config_from_dict_rebuilds_nested_configs_and_tuples():
    from transferlab.core.config import config_from_dict, to_dict

    cfg = apply_overrides(Outer(), ["method.top_k=4", "arms=a"])
    assert config_from_dict(Outer, to_dict(cfg)) == cfg
    assert config_from_dict(Outer, {**to_dict(cfg), "dropped_field": 1}) == cfg  # old folders still render


def test_config_from_dict_routes_flat_keys_of_an_older_version_into_the_nested_config():
    from transferlab.core.config import config_from_dict

    old_flat = {"arms": ["a"], "seeds": 1, "top_k": 4}
    assert config_from_dict(Outer, old_flat).method == Inner(top_k=4)
