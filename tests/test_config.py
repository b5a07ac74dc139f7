from __future__ import annotations

import pytest

from mdm_circuits.errors import ConfigError
from mdm_circuits.model.config import ModelConfig

BASE = dict(vocab_size=10, d_model=8, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=4, d_mlp=16)


def test_round_trip_through_dict():
    config = ModelConfig(**BASE, attention="bidirectional", logit_shift=False, mask_token_id=9)
    assert ModelConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("change, message", [
    (dict(n_heads=3, n_kv_heads=2), r"n_heads \(3\) must be a multiple of n_kv_heads \(2\)"),
    (dict(head_dim=3), "head_dim must be even"),
    (dict(attention="sliding"), "attention must be one of"),
    (dict(mask_token_id=10), r"mask_token_id must be a token id in \[0, vocab_size=10\)"),
    (dict(d_model=0), "d_model must be a positive integer"),
    (dict(qkv_bias="yes"), "qkv_bias must be a bool"),
    (dict(norm_eps=-1.0), "norm_eps must be a positive number"),
])
def test_inconsistent_configs_are_refused(change, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig(**(BASE | change))


def test_unknown_and_missing_fields_are_refused():
    with pytest.raises(ConfigError, match=r"unknown ModelConfig field\(s\) \['rope_scaling'\]"):
        ModelConfig.from_dict(BASE | {"rope_scaling": None})
    with pytest.raises(ConfigError, match=r"missing required field\(s\) \['d_mlp'\]"):
        ModelConfig.from_dict({k: v for k, v in BASE.items() if k != "d_mlp"})


def test_read_position_follows_the_logit_shift():
    assert ModelConfig(**BASE).read_position(7) == 6
    assert ModelConfig(**BASE, logit_shift=False).read_position(7) == 7
