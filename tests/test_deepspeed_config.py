"""FlashCommConfig (the config of enable_deepspeed and of the "moe_flashcomm" section of a
DeepSpeed JSON config): defaults, JSON round trip, per-layer rules, errors naming the field.
No processes are spawned here."""
import json
import subprocess
import sys
from dataclasses import fields, replace

import pytest

from moe_flashcomm import CodecConfig, LinkCodecs
from moe_flashcomm.config import ConfigError, FlashCommConfig, missing_section_message


def test_defaults_and_round_trip(tmp_path):
    c = FlashCommConfig()
    assert c.enabled and c.algorithm == "flat" and c.gate is True and c.chunks is None
    assert c.dispatch == LinkCodecs(CodecConfig(), CodecConfig())
    assert c.combine == LinkCodecs(CodecConfig(), CodecConfig())
    assert c.dispatch_grad == c.combine_grad == LinkCodecs(8, 8)
    assert c.layers == ()
    assert FlashCommConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    assert FlashCommConfig.from_dict({}) == c

    rich = FlashCommConfig.from_dict({
        "dispatch": {"bits": 3, "group_size": 64},
        "combine": {"intra_node": "bf16", "inter_node": 4},
        "combine_grad": {"bits": 8, "rounding": "stochastic"},
        "chunks": "auto",
        "gate": False,
        "layers": [{"match": "*.0.*", "dispatch": "fp8"}, {"index": [1, 2], "enabled": False}],
    })
    assert rich.dispatch.intra_node == CodecConfig(bits=3, group_size=64)
    assert rich.combine == LinkCodecs("bf16", 4)
    assert rich.chunks is None and rich.gate is False
    assert FlashCommConfig.from_dict(json.loads(json.dumps(rich.to_dict()))) == rich

    ds_json = tmp_path / "ds.json"
    ds_json.write_text(json.dumps({"train_micro_batch_size_per_gpu": 1,
                                   "moe_flashcomm": {"dispatch": 8}}))
    assert FlashCommConfig.from_deepspeed_config(str(ds_json)).dispatch == LinkCodecs(8, 8)
    assert FlashCommConfig.from_deepspeed_config({"train_batch_size": 8}) is None
    assert FlashCommConfig.from_deepspeed_config({"moe_flashcomm": None}) == FlashCommConfig()
    # a whole DeepSpeed config given as `config` means its section
    assert FlashCommConfig.coerce({"bf16": {"enabled": True}, "moe_flashcomm": {"combine": 2}}
                                  ).combine == LinkCodecs(2, 2)
    assert FlashCommConfig.coerce(None) == FlashCommConfig()


def test_native_codec_in_every_codec_field():
    """"native" is a codec like the others in the JSON section: every field, per link,
    per layer rule, and the all-reduce; it round-trips through JSON."""
    section = {f: "native" for f in ("dispatch", "combine", "dispatch_grad", "combine_grad")}
    section["combine"] = {"intra_node": "native", "inter_node": {"bits": 4}}
    section["layers"] = [{"index": 0, "dispatch": {"bits": "native"}}]
    section["all_reduce"] = "native"
    c = FlashCommConfig.from_deepspeed_config({"moe_flashcomm": section})
    native = CodecConfig(bits="native")
    assert c.dispatch == c.dispatch_grad == c.combine_grad == LinkCodecs(native, native)
    assert c.combine == LinkCodecs(native, 4) and c.all_reduce == LinkCodecs(native, native)
    assert c.for_layer("x", 0).dispatch == LinkCodecs(native, native)
    assert FlashCommConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    assert "dispatch=native" in c.describe()


def test_layer_rules_apply_in_order():
    c = FlashCommConfig(dispatch=4, layers=[
        {"match": "blocks.*", "combine": 8},
        {"match": ["*.3.*", "head.*"], "dispatch": "bf16"},
        {"index": 0, "dispatch": 2},
        {"index": [5], "enabled": False},
    ])
    a = c.for_layer("blocks.0.moe.deepspeed_moe", 0)
    assert a.dispatch == LinkCodecs(2, 2) and a.combine == LinkCodecs(8, 8) and a.layers == ()
    b = c.for_layer("blocks.3.moe.deepspeed_moe", 3)
    assert b.dispatch == LinkCodecs("bf16", "bf16") and b.combine == LinkCodecs(8, 8)
    assert c.for_layer("head.moe", 4).combine == LinkCodecs(4, 4)
    assert not c.for_layer("other", 5).enabled
    assert c.for_layer("other", 1) == FlashCommConfig(dispatch=4)


@pytest.mark.parametrize("bad, needle", [
    ({"dispatch": 9}, "moe_flashcomm.dispatch: CodecConfig.bits must be an int 2..8"),
    ({"combine": {"bits": 4, "group": 64}}, "moe_flashcomm.combine: unknown codec field(s) ['group']"),
    ({"dispatch_grad": {"intra_node": 8, "internode": 4}},
     "moe_flashcomm.dispatch_grad: unknown link field(s) ['internode']; allowed: intra_node, inter_node"),
    ({"combine_grad": {"inter_node": {"group_size": 100}}},
     "moe_flashcomm.combine_grad: LinkCodecs.inter_node: CodecConfig.group_size must be one of"),
    ({"dispatch": [4]}, "moe_flashcomm.dispatch"),
    ({"algorithm": "ring"}, "moe_flashcomm.algorithm must be one of ('flat', 'hierarchical', 'auto'), got 'ring'"),
    ({"chunks": 0}, 'moe_flashcomm.chunks must be an int >= 1 or "auto"'),
    ({"chunks": True}, "moe_flashcomm.chunks"),
    ({"gate": 5}, "moe_flashcomm.gate must be true, false, a thresholds dict or a JSON file path"),
    ({"gate": {"pcie": {"int4": 100}}}, "moe_flashcomm.gate: size gate: unknown path 'pcie'"),
    ({"enabled": "yes"}, "moe_flashcomm.enabled must be true or false"),
    ({"dispatch_codec": 4}, "moe_flashcomm: unknown field(s) ['dispatch_codec']; allowed: enabled, "
                            "dispatch, combine, dispatch_grad, combine_grad, algorithm, gate, chunks, layers"),
    ({"layers": {"*": {}}}, "moe_flashcomm.layers must be a list of rules"),
    ({"layers": "blocks.*"}, "moe_flashcomm.layers must be a list of rules"),
    ({"layers": 3}, "moe_flashcomm.layers must be a list of rules"),
    ({"layers": [3]}, "moe_flashcomm.layers[0] must be a dict"),
    ({"dispatch": "4"}, "moe_flashcomm.dispatch: CodecConfig.bits must be an int 2..8, 'fp8', 'bf16' or 'native', got '4'"),
    ({"dispatch": {"bits": 4, "group_size": 64.0}}, "CodecConfig.group_size must be one of (32, 64, 128, 256) (an int), got 64.0"),
    ({"combine": {"bits": 4, "spikes": 1}}, "moe_flashcomm.combine: CodecConfig.spikes must be True or False"),
    ({"chunks": 2.0}, 'moe_flashcomm.chunks must be an int >= 1 or "auto"'),
    ({"algorithm": ["flat"]}, "moe_flashcomm.algorithm must be one of"),
    ({"gate": {"host": {"int44": 5}}}, "moe_flashcomm.gate: size gate: unknown codec key 'int44' in thresholds['host']; allowed: int2, int3"),
    ({"gate": {"thresholds": [["host", 5]]}}, "moe_flashcomm.gate: size gate: thresholds must be a table"),
    ({"gate": {"thresholds": {}, "all_reduce": {}, "extra": 1}}, "moe_flashcomm.gate: size gate: unknown key(s) 'extra'"),
    ({"layers": [{"dispatch": 4}]}, "moe_flashcomm.layers[0] needs exactly one of 'match'"),
    ({"layers": [{"match": "a", "index": 1}]}, "moe_flashcomm.layers[0] needs exactly one of"),
    ({"layers": [{"match": "a"}, {"index": -2}]}, "moe_flashcomm.layers[1].index must be an int >= 0"),
    ({"layers": [{"match": ""}]}, "moe_flashcomm.layers[0].match must be a glob string"),
    ({"layers": [{"match": "a", "combine": "int4"}]}, "moe_flashcomm.layers[0].combine: CodecConfig.bits"),
    ({"layers": [{"match": "a", "layers": []}]}, "moe_flashcomm.layers[0]: unknown field(s) ['layers']"),
    ({"gate": "/nonexistent/gate.json"},
     "moe_flashcomm.gate: cannot read size-gate file '/nonexistent/gate.json'"),
    # a boolean in quotes is a file path: the message says how to write the boolean
    ({"gate": "true"}, "No such file or directory: 'true' (a string is a gate file's path; "
                       "JSON true / false, unquoted, turn the gate on / off)"),
    ({"gate": "off"}, "(a string is a gate file's path; JSON true / false"),
    ({"all_reduce": "yes"}, "moe_flashcomm.all_reduce: CodecConfig.bits must be an int 2..8, "
                            "'fp8', 'bf16' or 'native', got 'yes' (all_reduce also takes true: "
                            "int4, or false / null: off)"),
    # the tools' --codecs spelling of a width: still an error, with the JSON spelling
    ({"dispatch": "int4"}, "CodecConfig.bits must be an int 2..8, 'fp8', 'bf16' or 'native', "
                           "got 'int4'; did you mean 4?"),
    ({"combine": {"intra_node": "bf16", "inter_node": {"bits": "INT 8"}}},
     "moe_flashcomm.combine: LinkCodecs.inter_node: CodecConfig.bits must be an int 2..8, 'fp8', "
     "'bf16' or 'native', got 'INT 8'; did you mean 8?"),
    ({"layers": [{"match": "a", "combine": "int2"}]}, "got 'int2'; did you mean 2?"),
    ({"layers": [{"match": "a"}, {"index": 0, "gate": "/nonexistent/gate.json"}]},
     "moe_flashcomm.layers[1].gate: cannot read size-gate file '/nonexistent/gate.json'"),
])
def test_bad_fields_raise_naming_the_field(bad, needle):
    with pytest.raises(ValueError) as e:
        FlashCommConfig.from_deepspeed_config({"moe_flashcomm": bad})
    assert isinstance(e.value, ConfigError)
    assert needle in str(e.value), str(e.value)


def test_the_bits_hint_is_of_the_value_rejected():
    """"did you mean N?" is of the "intN" the error names, not of another link's value."""
    with pytest.raises(ConfigError) as e:
        FlashCommConfig.from_deepspeed_config(
            {"moe_flashcomm": {"dispatch": {"intra_node": "fp4", "inter_node": "int8"}}})
    assert "got 'fp4'" in str(e.value) and "did you mean" not in str(e.value), str(e.value)


@pytest.mark.parametrize("links", [{"intra_node": "native", "inter_node": 4},
                                   {"intra_node": "bf16", "inter_node": "native"}])
def test_all_reduce_mixing_native_per_link_is_rejected_when_built(links):
    """A "native" all-reduce is torch.distributed.all_reduce itself: mixed with another codec
    per link it raised only at the first forward of a patched layer, not naming the field."""
    for build, where in ((lambda: FlashCommConfig(all_reduce=links), "FlashCommConfig"),
                         (lambda: FlashCommConfig.from_deepspeed_config(
                             {"moe_flashcomm": {"all_reduce": links}}), "moe_flashcomm")):
        with pytest.raises(ConfigError, match=rf"^{where}\.all_reduce: a 'native' all-reduce .* "
                                              r"use 'native' for both intra_node and inter_node, "
                                              r"or for neither"):
            build()
    both = FlashCommConfig(all_reduce={"intra_node": "native", "inter_node": "native"})
    assert both.all_reduce == LinkCodecs.coerce("native")


def test_constructor_validates_too():
    with pytest.raises(ConfigError, match=r"FlashCommConfig\.combine: CodecConfig\.bits"):
        FlashCommConfig(combine=1)
    with pytest.raises(ConfigError, match=r"FlashCommConfig\.layers\[0\]\.dispatch_grad"):
        FlashCommConfig(layers=[{"index": 0, "dispatch_grad": "fp4"}])
    with pytest.raises(TypeError, match="config must be a FlashCommConfig, a dict, a DeepSpeed "
                                        "JSON config path or None, got int"):
        FlashCommConfig.coerce(4)


def test_what_is_not_a_config_is_named():
    """A section, a DeepSpeed config or a gate path of the wrong kind says what it got."""
    with pytest.raises(ConfigError, match="moe_flashcomm must be a dict, got list"):
        FlashCommConfig.from_deepspeed_config({"moe_flashcomm": ["int4"]})
    with pytest.raises(TypeError, match="expected a DeepSpeed config dict or JSON path, got int"):
        FlashCommConfig.from_deepspeed_config(3)
    assert FlashCommConfig.from_deepspeed_config({"train_batch_size": 8}) is None
    assert FlashCommConfig.from_deepspeed_config({"moe_flashcomm": None}) == FlashCommConfig()


def test_a_whole_deepspeed_config_without_the_section_is_named(tmp_path):
    """Given where the section's fields go, a DeepSpeed config without the section is an
    error that says so (guessing it meant the defaults could hide a misspelt section); a
    DeepSpeed JSON file's path is read for its section, the defaults without one."""
    ds = {"train_micro_batch_size_per_gpu": 1, "optimizer": {"type": "AdamW"}}
    with pytest.raises(ConfigError) as e:
        FlashCommConfig.coerce(ds)
    assert str(e.value) == (
        "FlashCommConfig: unknown field(s) ['optimizer', 'train_micro_batch_size_per_gpu']: "
        "this looks like a whole DeepSpeed config without a \"moe_flashcomm\" section; put the "
        "moe_flashcomm settings under a \"moe_flashcomm\" section of it (or pass that section "
        "itself)")
    with pytest.raises(ConfigError, match=r"looks like a whole DeepSpeed config .* key "
                                          r"'moe_flashcom' is not read: did you mean .moe_flashcomm.\?"):
        FlashCommConfig.coerce({**ds, "moe_flashcom": {"dispatch": 8}})
    path = tmp_path / "ds_config.json"
    path.write_text(json.dumps({**ds, "moe_flashcomm": {"dispatch": 8}}))
    for given in (path, str(path)):
        assert FlashCommConfig.coerce(given) == FlashCommConfig(dispatch=8)
    path.write_text(json.dumps(ds))
    assert FlashCommConfig.coerce(path) == FlashCommConfig()


@pytest.mark.parametrize("keys, named", [
    (["train_batch_size"], None),
    (["train_batch_size", "moe_flashcom"], "key 'moe_flashcom' is not"),
    (["moe-flashcomm", "MoE_FlashComm", "flash_comm", "bf16"],
     "keys 'moe-flashcomm', 'MoE_FlashComm', 'flash_comm' are not"),
    (["moe_flashcomn"], "key 'moe_flashcomn' is not"),
])
def test_a_config_without_the_section_names_a_misspelt_one(keys, named):
    """What enable_deepspeed warns (rank 0) of a DeepSpeed config without the section: the
    defaults run, and a key that looks like the section misspelt is named."""
    msg = missing_section_message({k: {} for k in keys})
    assert msg.startswith('moe_flashcomm: the DeepSpeed config has no "moe_flashcomm" section: '
                          f"the defaults are used ({FlashCommConfig().describe()})"), msg
    if named is None:
        assert "did you mean" not in msg, msg
    else:
        assert msg.endswith(f'; {named} read: did you mean "moe_flashcomm"?'), msg


def test_a_gate_file_is_loaded_when_the_config_is_built(tmp_path):
    """A gate path, at the top or in a rule, is read at once: a bad file is a ConfigError
    naming the field and the file's problem (not an error at enable time), and the config
    keeps the tables read, not the path (which a later read could find changed or gone)."""
    good = tmp_path / "gate.json"
    good.write_text(json.dumps({"thresholds": {"host": {"int4": 5}}}))
    cfg = FlashCommConfig(gate=good, layers=[{"index": 0, "gate": str(good)}])
    good.write_text(json.dumps({"thresholds": {"host": {"int4": 6}}, "all_reduce": {}}))
    read = {"thresholds": {"host": {"int4": 5}}}
    assert cfg.gate == cfg.for_layer("x", 0).gate == read
    assert cfg.to_dict()["gate"] == read
    assert FlashCommConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert FlashCommConfig(gate=good).gate == {"thresholds": {"host": {"int4": 6}},
                                                "all_reduce": {}}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"thresholds": {"nvlink": {"int4": "big"}}}))
    problem = f"size gate {bad}: thresholds['nvlink']['int4'] must be an int >= 0 (bytes), got 'big'"
    with pytest.raises(ConfigError) as e:
        FlashCommConfig(gate=bad)
    assert str(e.value) == f"FlashCommConfig.gate: {problem}"
    with pytest.raises(ConfigError) as e:
        FlashCommConfig.from_deepspeed_config(
            {"moe_flashcomm": {"gate": str(good), "layers": [{"match": "*", "gate": str(bad)}]}})
    assert str(e.value) == f"moe_flashcomm.layers[0].gate: {problem}"


def test_null_is_the_default_and_in_a_rule_inherits():
    """null (None) at the top level is each field's default (the gradients' int8, not
    CodecConfig's int4); in a layer rule it overrides nothing."""
    nulls = {f.name: None for f in fields(FlashCommConfig)}
    assert FlashCommConfig.from_dict(nulls) == FlashCommConfig(**nulls) == FlashCommConfig()
    c = FlashCommConfig.from_deepspeed_config({"moe_flashcomm": {"dispatch_grad": None,
                                                                 "combine_grad": None}})
    assert c.dispatch_grad == c.combine_grad == LinkCodecs(8, 8)
    base = FlashCommConfig(dispatch=2, dispatch_grad=4, gate=False, enabled=True, layers=[
        {"index": 0, **{f: None for f in nulls if f not in ("layers", "all_reduce")}},
        {"index": 1, "dispatch": None, "combine": "bf16"}])
    assert base.for_layer("a", 0) == replace(base, layers=())
    one = base.for_layer("b", 1)
    assert one.dispatch == LinkCodecs(2, 2) and one.combine == LinkCodecs("bf16", "bf16")
    assert [k for k, _ in base.layers[1].overrides] == ["combine"]


def test_package_imports_without_deepspeed():
    """The GPU machine has no DeepSpeed: the package must import, and enable_deepspeed must
    say what is missing."""
    code = (
        "import sys; sys.modules['deepspeed'] = None\n"  # makes `import deepspeed` fail
        "import torch, moe_flashcomm\n"
        "try:\n"
        "    moe_flashcomm.enable_deepspeed(torch.nn.Linear(2, 2))\n"
        "except ImportError as e:\n"
        "    assert 'needs DeepSpeed' in str(e), e\n"
        "    print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
