"""param_groups.py without DeepSpeed: which parameters weight decay and LARS's adaptation reach."""

from __future__ import annotations

import torch
from torch import nn

from ssl_dist.param_groups import param_groups


def small_model() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 4), nn.LayerNorm(4))


def names(model, group):
    by_id = {id(p): n for n, p in model.named_parameters()}
    return [by_id[id(p)] for p in group["params"]]


def test_lars_adapts_and_decays_the_matrices_only():
    model = small_model()
    decayed, kept = param_groups(model, 0.5, lars=True)
    assert names(model, decayed) == ["0.weight", "3.weight"]
    assert decayed["weight_decay"] == 0.5 and decayed["always_adapt"] is True
    assert names(model, kept) == ["0.bias", "1.weight", "1.bias", "3.bias", "4.weight", "4.bias"]
    # timm's Lars adapts a group only when its weight decay is not 0 or always_adapt is set
    assert kept["weight_decay"] == 0.0 and kept["always_adapt"] is False


def test_lars_adapts_a_matrix_even_without_weight_decay():
    decayed, _ = param_groups(small_model(), 0.0, lars=True)
    assert decayed["always_adapt"] is True


def test_partitioned_lars_has_one_group_per_adapted_parameter():
    """ZeRO flattens each group into one tensor: a matrix's norm must be its own."""
    model = small_model()
    groups = param_groups(model, 0.5, lars=True, per_parameter=True)
    assert [names(model, g) for g in groups] == [["0.weight"], ["3.weight"],
                                                 ["0.bias", "1.weight", "1.bias", "3.bias", "4.weight", "4.bias"]]
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_adamw_and_sgd_groups_keep_the_two_group_layout_of_earlier_checkpoints():
    groups = param_groups(small_model(), 0.5)
    assert [g["weight_decay"] for g in groups] == [0.5, 0.0] and all("always_adapt" not in g for g in groups)


def test_frozen_parameters_are_left_out():
    model = small_model()
    model[0].weight.requires_grad_(False)
    assert all(p is not model[0].weight for g in param_groups(model, 0.5, lars=True) for p in g["params"])
    assert torch.is_tensor(model[0].weight)
