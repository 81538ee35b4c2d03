import os

import pytest

from moe_flashcomm import CodecConfig


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8, "fp8", "bf16", "native"])
def test_valid_configs_round_trip_through_dict(bits):
    cfg = CodecConfig(bits=bits, group_size=64,
                      rounding="stochastic" if isinstance(bits, int) else "nearest")
    assert CodecConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("bits", ["fp8", "bf16", "native"])
def test_stochastic_rounding_needs_an_integer_width(bits):
    """These round to nearest: a stochastic config of them would be silently biased."""
    with pytest.raises(ValueError, match=f"rounding='stochastic' needs an integer width 2..8 .*"
                                         f"got bits='{bits}'"):
        CodecConfig(bits=bits, rounding="stochastic")


def test_link_codecs_hash_is_made_again_when_loaded(tmp_path):
    """A LinkCodecs pickled by a process with another string hash seed keys the same cache
    entries as one made here (its cached hash is not carried over)."""
    import pickle
    import subprocess
    import sys
    from moe_flashcomm import LinkCodecs
    code = ("import pickle, sys; from moe_flashcomm import LinkCodecs; "
            "sys.stdout.buffer.write(pickle.dumps(LinkCodecs('bf16', 4)))")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    blob = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          check=True, timeout=120).stdout
    loaded, here = pickle.loads(blob), LinkCodecs("bf16", 4)
    assert loaded == here and hash(loaded) == hash(here)
    assert {here: 1}.get(loaded) == 1


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


def test_coerce():
    assert CodecConfig.coerce(None) == CodecConfig()
    assert CodecConfig.coerce(2) == CodecConfig(bits=2)
    assert CodecConfig.coerce("native") == CodecConfig(bits="native")
    with pytest.raises(TypeError, match="CodecConfig"):
        CodecConfig.coerce(3.5)


@pytest.mark.parametrize("field,value", [
    ("bits", "4"), ("bits", "6"), ("bits", " fp8"), ("bits", "NATIVE"), ("bits", 4.0),
    ("bits", None), ("group_size", 64.0), ("group_size", "64"), ("group_size", None),
    ("spikes", 1), ("spikes", 0.0), ("rounding", ["nearest"]), ("rounding", None),
])
def test_types_are_exact(field, value):
    """No float group sizes, no digit strings for bits, no ints for bools: each names the
    field and what is allowed."""
    with pytest.raises(ValueError, match=f"CodecConfig.{field} must be") as e:
        CodecConfig(**{field: value})
    if field == "bits":
        assert "an int 2..8, 'fp8', 'bf16' or 'native'" in str(e.value)


def test_rejected_config_leaves_the_layout_cache_sound():
    """A float group size once compared equal to the int and poisoned the layout cache."""
    from moe_flashcomm import record_bytes, record_layout
    with pytest.raises(ValueError, match="group_size"):
        CodecConfig(group_size=64.0)
    with pytest.raises(ValueError, match="group_size"):
        record_bytes(4096, {"bits": 4, "group_size": 64.0})
    for g in (32, 64, 128, 256):
        n = record_bytes(4096, CodecConfig(group_size=g))
        assert type(n) is int and n % 16 == 0
        L = record_layout(4096, CodecConfig(group_size=g))
        assert all(type(v) is int for v in (L.group_size, L.n_groups, L.padded_hidden))
    assert record_bytes(4096, CodecConfig(group_size=64)) == 4096 // 2 + 64 * 10  # codes, meta


@pytest.mark.parametrize("bad", [[("bits", 4)], "bits=4", 4, None, (("bits", 4),)])
def test_from_dict_needs_a_mapping(bad):
    with pytest.raises(TypeError, match="CodecConfig.from_dict needs a dict of the fields "
                                        "bits, group_size, spikes, rounding"):
        CodecConfig.from_dict(bad)


def test_unknown_dict_keys_of_any_type_are_named():
    with pytest.raises(ValueError, match=r"unknown codec field\(s\) \['bitz', 3\]; allowed"):
        CodecConfig.from_dict({"bitz": 4, 3: 1})


def test_native_is_exact_for_every_dtype_and_has_no_groups():
    import torch

    from moe_flashcomm import decode, encode, record_bytes, record_layout
    cfg = CodecConfig(bits="native", spikes=True, group_size=32)
    assert cfg.is_native and not cfg.is_quantized and not cfg.is_passthrough and not cfg.spikes
    assert str(cfg) == "native" and CodecConfig.from_dict(cfg.to_dict()) == cfg
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = torch.randn(5, 37).to(dtype)
        x[0, 0], x[1, 1], x[2, 2] = float("nan"), float("inf"), -0.0
        x.view(torch.int16 if dtype.itemsize == 2 else torch.int32)[3, 3] = -1  # a negative NaN
        rec = encode(x, cfg)
        assert rec.shape == (5, record_bytes(37, cfg, dtype)) == (5, -(-37 * dtype.itemsize // 16) * 16)
        assert record_layout(37, cfg, dtype).bits_per_value == rec.shape[1] * 8 / 37
        y = decode(rec, cfg, 37, dtype)
        assert y.dtype == dtype and torch.equal(y.view(torch.uint8), x.view(torch.uint8))
        assert not rec[:, 37 * dtype.itemsize:].any()  # padding is zero
    with pytest.raises(ValueError, match="'native' codec's records are the tokens' own bytes.*dtype="):
        record_bytes(37, cfg)
    with pytest.raises(ValueError, match="160 bytes per token but hidden=37 needs record_bytes=80"):
        # fp32 records decoded as bf16 ones
        decode(encode(torch.ones(2, 37), cfg), cfg, 37, torch.bfloat16)


def test_only_env_py_reads_environment_variables():
    """README, "Environment variables": every variable is read by moe_flashcomm/env.py, so its
    table is the whole list (writes, as the tuner's link emulation makes, are fine)."""
    import re
    from pathlib import Path
    import moe_flashcomm
    read = re.compile(r"os\.getenv\(|os\.environ\.get\(|os\.environ\[[^\]]+\](?!\s*=)")
    package = Path(moe_flashcomm.__file__).parent
    readers = [str(f.relative_to(package)) for f in sorted(package.rglob("*.py"))
               if f.name != "env.py" and read.search(f.read_text())]
    assert readers == []


def test_a_rules_auto_chunks_survive_the_json_round_trip():
    """A rule's "chunks": "auto" overrides a base chunk count; its to_dict once wrote null,
    which in a rule means "keep the base's", so the reloaded config chunked that layer."""
    import json
    from moe_flashcomm.config import FlashCommConfig
    cfg = FlashCommConfig(chunks=4, layers=[{"index": 0, "chunks": "auto"}, {"index": 1, "chunks": 2}])
    assert [cfg.for_layer("a", i).chunks for i in range(3)] == [None, 2, 4]
    back = FlashCommConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg
    assert [back.for_layer("a", i).chunks for i in range(3)] == [None, 2, 4]


@pytest.mark.parametrize("bad", [4.0, [4], b"fp8"])
def test_a_codec_of_the_wrong_type_says_what_is_allowed(bad):
    """A codec that is neither a CodecConfig, a dict nor a bits value (a JSON 4.0 included)
    names the value and the bits values allowed, also under a config field's name."""
    from moe_flashcomm.config import ConfigError, FlashCommConfig
    allowed = "an int 2..8, 'fp8', 'bf16' or 'native'"
    with pytest.raises(TypeError) as e:
        CodecConfig.coerce(bad)
    assert allowed in str(e.value) and repr(bad) in str(e.value)
    with pytest.raises(ConfigError) as e:
        FlashCommConfig.from_dict({"dispatch": bad}, where="moe_flashcomm")
    assert str(e.value).startswith("moe_flashcomm.dispatch: ") and allowed in str(e.value)


def test_config_keys_of_any_type_are_named():
    """Unknown keys that are not all strings (a YAML file makes ints, bools and None of some)
    are named in a ConfigError, at the top and in a rule, as CodecConfig.from_dict does;
    sorting them once raised a bare TypeError."""
    from moe_flashcomm.config import ConfigError, FlashCommConfig
    with pytest.raises(ConfigError, match=r"moe_flashcomm: unknown field\(s\) \['x', 3\]; allowed: enabled"):
        FlashCommConfig.from_dict({"dispatch": 4, 3: 8, "x": 1}, where="moe_flashcomm")
    with pytest.raises(ConfigError, match=r"moe_flashcomm.layers\[0\]: unknown field\(s\) \['y', None, True\]"):
        FlashCommConfig.from_dict({"layers": [{"index": 0, None: 1, True: 2, "y": 3}]},
                                  where="moe_flashcomm")


def test_link_keys_of_any_type_are_named():
    """A per-link codec dict with keys that are not all strings names them (sorting them once
    raised a bare TypeError, seen as "'<' not supported")."""
    from moe_flashcomm.config import ConfigError, FlashCommConfig
    with pytest.raises(ConfigError, match=r"unknown link field\(s\) \['x', 3\]; allowed: intra"):
        FlashCommConfig.from_dict({"dispatch": {"intra_node": 4, 3: 1, "x": 2}})


def test_a_hand_made_layer_rule_is_checked_as_its_dict_would_be():
    """LayerRule is public: one built by hand once skipped every check, so a glob given as a
    string matched per character ("*" of "*.moe" selected every layer), a bad field in
    ``overrides`` (all_reduce, not a per-layer field) was applied, and a rule with both
    'match' and 'index' silently used the index."""
    from moe_flashcomm.config import ConfigError, FlashCommConfig, LayerRule
    cfg = FlashCommConfig(layers=[LayerRule(match="*.moe", overrides=(("enabled", False),))])
    assert cfg.layers == (LayerRule(("*.moe",), (), (("enabled", False),)),)
    assert cfg.for_layer("blocks.0.mlp", 0).enabled and not cfg.for_layer("b.moe", 1).enabled
    assert FlashCommConfig(layers=[LayerRule(index=3)]).layers[0].index == (3,)
    with pytest.raises(ConfigError, match=r"layers\[0\].overrides must be \(field, value\) "
                                          r"pairs of the fields enabled, .*got \(\('all_reduce', 4\),\)"):
        FlashCommConfig(layers=[LayerRule(index=(0,), overrides=(("all_reduce", 4),))])
    with pytest.raises(ConfigError, match=r"layers\[0\] needs exactly one of 'match'"):
        FlashCommConfig(layers=[LayerRule(match=("q",), index=(0,))])
    with pytest.raises(ConfigError, match=r"layers\[0\].dispatch: .*got 99"):
        FlashCommConfig(layers=[LayerRule(index=(0,), overrides=(("dispatch", 99),))])
    # a checked rule goes through again unchanged ("auto" chunks included)
    rule = FlashCommConfig(layers=[{"index": 0, "chunks": "auto", "dispatch": 8}]).layers[0]
    assert FlashCommConfig(chunks=2, layers=[rule]).layers == (rule,)
    assert FlashCommConfig(chunks=2, layers=[rule]).for_layer("x", 0).chunks is None


def test_a_config_keeps_its_own_copy_of_a_gate_table():
    """A gate dict is checked when the config is built: the caller's dict changed after that,
    or the dict to_dict returned, once changed the checked (frozen) config."""
    from moe_flashcomm.config import FlashCommConfig
    table = {"host": {"int4": 5}}
    cfg = FlashCommConfig(gate=table, layers=[{"index": 0, "gate": {"host": {"int8": 7}}}])
    table["host"]["int4"] = -1
    d = cfg.to_dict()
    d["gate"]["host"]["int4"] = "big"
    d["layers"][0]["gate"]["host"]["int8"] = "big"
    assert cfg.gate == {"host": {"int4": 5}}
    assert cfg.for_layer("x", 0).gate == {"host": {"int8": 7}}


@pytest.mark.parametrize("value", ["1_000", "\u0663", "\uff17"])
def test_int_variables_take_plain_digits_only(monkeypatch, value):
    """Python's int() takes "1_000" and other scripts' digits (Arabic-Indic 3, fullwidth 7),
    which no launcher or shell writes: each is refused naming the variable, as "1e3" is."""
    from moe_flashcomm import env
    monkeypatch.setenv("MOE_FLASHCOMM_TIMEOUT_S", value)
    with pytest.raises(ValueError, match=f"environment variable MOE_FLASHCOMM_TIMEOUT_S={value!r}: "
                                         "expected an int from 1 to 1000000000"):
        env.timeout_s()
    monkeypatch.setenv("MOE_FLASHCOMM_TIMEOUT_S", " +42 ")
    assert env.timeout_s() == 42


def test_the_kernel_cache_path_expands_the_home_directory(monkeypatch):
    """MOE_FLASHCOMM_CACHE=~/kernels (as a shell would not expand it inside quotes, or as a
    launcher's env file passes it) meant a directory literally named "~" in the working
    directory of each rank."""
    from pathlib import Path
    from moe_flashcomm import env
    monkeypatch.setenv("MOE_FLASHCOMM_CACHE", "~/kernels")
    assert env.kernel_cache_dir() == Path.home() / "kernels"


@pytest.mark.parametrize("bits", ["bf16", "native"])
def test_codecs_without_groups_ignore_the_group_size(bits):
    """"bf16" and "native" have no groups: their group_size once made equal codecs unequal, so
    two ranks sending the same bytes raised ConfigMismatchError (and headers differed)."""
    from moe_flashcomm.comm.frame import wire_code
    a, b = CodecConfig(bits=bits, group_size=32), CodecConfig(bits=bits)
    assert a == b and hash(a) == hash(b) and a.group_size == 128
    assert wire_code(a) == wire_code(b)
    assert CodecConfig(bits="fp8", group_size=32).group_size == 32  # fp8 has groups
    with pytest.raises(ValueError, match="CodecConfig.group_size must be one of"):
        CodecConfig(bits=bits, group_size=100)  # still checked


@pytest.mark.parametrize("content", [b'{"moe_flashcomm": {,}', b"\xff\xfe{}"])
def test_a_deepspeed_config_file_that_is_not_json_names_the_file(tmp_path, content):
    """A JSON syntax error (or bytes that are not UTF-8) once raised json's or the codec's
    message alone, which names no file."""
    from moe_flashcomm.config import ConfigError, FlashCommConfig
    path = tmp_path / "ds_config.json"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=f"DeepSpeed config {str(path)!r} cannot be read as JSON: "):
        FlashCommConfig.from_deepspeed_config(path)


def test_a_deepspeed_config_path_that_cannot_be_read_says_how_a_string_is_read(tmp_path):
    """``enable_deepspeed(model, "int4")`` raised a bare FileNotFoundError for 'int4'; a
    repeated section was read silently, the last one winning (DeepSpeed's loader refuses)."""
    from moe_flashcomm.config import ConfigError, FlashCommConfig
    with pytest.raises(ConfigError, match="cannot read DeepSpeed config 'int4': .* \\(a config given "
                                          "as a string is a DeepSpeed JSON file's path"):
        FlashCommConfig.coerce("int4")
    path = tmp_path / "ds_config.json"
    path.write_text('{"moe_flashcomm": {"dispatch": 4}, "moe_flashcomm": {"dispatch": 2}}')
    with pytest.raises(ConfigError, match="the key 'moe_flashcomm' appears twice in one object"):
        FlashCommConfig.from_deepspeed_config(path)


@pytest.mark.parametrize("content", ['[{"moe_flashcomm": {}}]', "null"])
def test_a_deepspeed_config_file_not_holding_an_object_names_the_file(tmp_path, content):
    """It said "expected a DeepSpeed config dict or JSON path, got list", though a path was
    given, and named no file."""
    from moe_flashcomm.config import ConfigError, FlashCommConfig
    path = tmp_path / "ds_config.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match=f"DeepSpeed config {str(path)!r} must hold a JSON object, got "):
        FlashCommConfig.from_deepspeed_config(path)


def test_configs_with_gate_tables_hash():
    """A frozen config whose gate (or a rule's) is a table raised TypeError in hash(); equal
    configs hash alike."""
    from moe_flashcomm.config import FlashCommConfig
    tables = {"host": {"int4": 5}}
    a = FlashCommConfig(gate=tables, layers=[{"match": "x", "gate": {"host": {"int8": 7}}}])
    b = FlashCommConfig.from_dict(a.to_dict())
    assert a == b and hash(a) == hash(b) and len({a, b, FlashCommConfig()}) == 2
    assert hash(a.layers[0]) == hash(b.layers[0])
    assert hash(FlashCommConfig(gate=tables)) != hash(FlashCommConfig(gate={"host": {"int4": 6}}))
