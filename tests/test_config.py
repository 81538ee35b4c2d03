import pytest

from moe_flashcomm import CodecConfig


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8, "fp8", "bf16"])
def test_valid_configs_round_trip_through_dict(bits):
    cfg = CodecConfig(bits=bits, group_size=64, rounding="stochastic")
    assert CodecConfig.from_dict(cfg.to_dict()) == cfg


def test_defaults():
    cfg = CodecConfig()
    assert (cfg.bits, cfg.group_size, cfg.spikes, cfg.rounding) == (4, 128, True, "nearest")


@pytest.mark.parametrize("field,value,allowed", [
    ("bits", 1, "2..8"), ("bits", 9, "2..8"), ("bits", "int4", "fp8"), ("bits", True, "2..8"),
    ("bits", 4.0, "2..8"), ("group_size", 100, "(32, 64, 128, 256)"),
    ("group_size", True, "(32, 64, 128, 256)"), ("spikes", "yes", "True or False"),
    ("rounding", "floor", "('nearest', 'stochastic')"),
])
def test_bad_field_raises_naming_field_and_allowed(field, value, allowed):
    with pytest.raises(ValueError) as e:
        CodecConfig(**{field: value})
    assert f"CodecConfig.{field}" in str(e.value) and allowed in str(e.value)


def test_unknown_dict_key_is_named():
    with pytest.raises(ValueError, match="bitz"):
        CodecConfig.from_dict({"bitz": 4})


def test_spikes_only_for_integer_widths():
    assert CodecConfig(bits="fp8").spikes is False
    assert CodecConfig(bits="bf16", spikes=True).spikes is False
    assert CodecConfig(bits=3).spikes is True


def test_coerce_and_digit_strings():
    assert CodecConfig.coerce(None) == CodecConfig()
    assert CodecConfig.coerce(2) == CodecConfig(bits=2)
    assert CodecConfig.coerce({"bits": "6"}).bits == 6
    with pytest.raises(TypeError, match="CodecConfig"):
        CodecConfig.coerce(3.5)
