"""Config loading: every shipped config, profiles, overrides, and clear errors."""

from __future__ import annotations

import dataclasses

import pytest

from derprop.errors import ConfigError
from derprop.provenance import source
from derprop.training.config import CHOICES, PROFILES, SECTIONS, TrainConfig, flatten, resolved
from derprop.training.configfile import dump_yaml, load_config

CONFIG_DIR = source() / "configs"
CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))


def test_configs_exist():
    names = {p.stem for p in CONFIGS}
    for n in ("voc_92", "voc_183", "voc_366", "voc_732", "voc_1464", "cityscapes_186", "cityscapes_372",
              "cityscapes_744", "cpu_scenes", "cpu_scenes_tiny"):
        assert n in names, n
    for split in (92, 183):
        for ab in ("wo_dlp", "wo_der", "wo_momentum", "op_central", "op_sum", "op_second"):
            assert f"voc_{split}_{ab}" in names
        for q in range(4):
            assert f"voc_{split}_Q{q}" in names and f"voc_{split}_Q{q}_nosparsity" in names


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_shipped_config_loads_and_resolves(path, tmp_path):
    cfg = load_config(path)
    r = resolved(cfg)
    assert r["eval"]["mode"] in ("original", "sliding", "center_crop")
    # the resolved config as a run folder's config.yaml holds it loads back to the same resolved config
    (tmp_path / "config.yaml").write_text(dump_yaml(cfg))
    assert resolved(load_config(tmp_path / "config.yaml")) == r


def test_table_rows_have_the_right_switches():
    c = load_config(CONFIG_DIR / ("voc_92_wo_dlp.yaml"))
    assert (c.method.dlp, c.method.derivative_loss, c.method.momentum) == (False, False, False)
    c = load_config(CONFIG_DIR / ("voc_183_Q2_nosparsity.yaml"))
    assert (c.method.Q, c.method.sparsity) == (2, False)
    c = load_config(CONFIG_DIR / ("voc_92_op_second.yaml"))
    assert c.method.op == "second"
    c = load_config(CONFIG_DIR / ("cityscapes_372.yaml"))
    assert (c.data.layout, c.data.split, c.model.num_classes, c.loss.ohem) == ("cityscapes", "1_8", 19, True)


def test_profile_sets_every_switch_and_user_keys_win():
    for name, values in PROFILES.items():
        flat = flatten(dataclasses.asdict(load_config(None, [f"profile={name}"])))
        for key, v in values.items():
            assert flat[key] == v, (name, key)
    cfg = load_config(None, ["profile=official", "method.blend_space=prob"])
    assert cfg.method.blend_space == "prob" and cfg.method.dlp_form == "softmax"


def test_profiles_differ_in_every_named_switch_and_name_real_keys():
    for key in PROFILES["official"]:
        section, name = key.split(".")
        assert name in {f.name for f in dataclasses.fields(SECTIONS[section])}
        assert PROFILES["official"][key] != PROFILES["paper"][key], key


def test_base_inheritance_and_overrides(tmp_path):
    (tmp_path / "a.yaml").write_text("profile: official\noptim:\n  lr: 0.5\n  epochs: 3\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\noptim:\n  epochs: 7\n")
    cfg = load_config(tmp_path / "b.yaml", ["data.split=1_8", "method.Q=2", "data.scale_range=[0.75, 1.5]"])
    assert (cfg.profile, cfg.optim.lr, cfg.optim.epochs) == ("official", 0.5, 7)
    assert cfg.data.split == "1_8"  # not the YAML number 18
    assert cfg.method.Q == 2 and cfg.data.scale_range == (0.75, 1.5)


@pytest.mark.parametrize(
    "override, words",
    [
        ("method.dlpp=false", ["'method.dlpp'", "derivative_loss", "blend_space"]),
        ("optimizer.lr=1", ["'optimizer'", "optim"]),
        ("method.op=backward", ["'method.op'", "forward", "central", "sum", "second"]),
        ("method.blend_space=log", ["'method.blend_space'", "logit", "prob"]),
        ("profile=both", ["'profile'", "official", "paper"]),
        ("method.Q=7", ["'method.Q'", "0, 1, 2, 3"]),
        ("method.dlp=maybe", ["'method.dlp'", "true or false"]),
        ("optim.lr=fast", ["'optim.lr'", "number"]),
        ("model.backbone=vgg16", ["model.backbone", "resnet101"]),
        ("eval.mode=full", ["'eval.mode'", "sliding"]),
        ("data.layout=ade20k", ["'data.layout'", "pascal", "cityscapes", "scenes"]),
        ("optim.amp=fp8", ["'optim.amp'", "bf16"]),
        ("nokey", ["key.sub=value"]),
    ],
)
def test_bad_keys_and_values_name_the_key_and_allowed_values(override, words):
    with pytest.raises(ValueError) as exc:
        load_config(None, [override])
    for w in words:
        assert w in str(exc.value), (w, str(exc.value))


def test_unknown_key_in_file_names_dotted_key(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text("method:\n  sparsityy: true\n")
    with pytest.raises(ValueError, match=r"'method\.sparsityy'.*allowed keys in 'method'"):
        load_config(p)
    p.write_text("base: x.yaml\n")
    with pytest.raises(ValueError, match="inherits from itself"):
        load_config(p)


def test_choices_name_real_fields_and_allow_every_default_and_switch_value():
    from functools import reduce

    from derprop.training.tables import DIVERGENCES

    for profile in ("official", "paper"):
        cfg = load_config(None, [f"profile={profile}"])
        for key, allowed in CHOICES.items():
            assert reduce(getattr, key.split("."), cfg) in allowed, (profile, key)
    for key, d in DIVERGENCES.items():
        if all(isinstance(v, str) for v in d.values):
            assert key in CHOICES and set(d.values) <= set(CHOICES[key]), key


@pytest.mark.parametrize("text, message", [
    ("optim:\n  lr: 0.1\n   epochs: 3\n", "{p}:3:10: mapping values are not allowed here"),
    ("optim: [1, 2\n", "{p}:2:1: expected ',' or ']'"),
    ("base: 123\n", "config {p}: 'base' must name another config file (relative to this one), e.g. base: voc.yaml; "
                    "got 123"),
    ("base: [a.yaml]\n", "config {p}: 'base' must name another config file"),
    ("base: .\n", "config {p.parent} (the base of {p}) is a folder; name a YAML file"),
])
def test_a_config_file_problem_is_one_line_naming_the_file_and_line(tmp_path, text, message):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as exc:
        load_config(p)
    assert str(exc.value).startswith(message.format(p=p)) and "\n" not in str(exc.value), str(exc.value)


def test_yaml_syntax_error_in_an_override_is_one_line_with_rc_2(capsys):
    from derprop.train import main

    with pytest.raises(ValueError, match=r"^override 'optim.lr=\[1':1:12: expected ',' or ']'"):
        load_config(None, ["optim.lr=[1"])
    assert main(["--config", str(CONFIG_DIR / "cpu_scenes_tiny.yaml"), "optim.lr=[1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: override 'optim.lr=[1':1:12:") and "\n" not in err


def test_every_float_notation_is_a_number(tmp_path):
    p = tmp_path / "f.yaml"
    p.write_text("optim:\n  lr: 1e-3\n  weight_decay: 5E-4\nloss:\n  eta: .5\n  scale: 1.0e+0\n")
    cfg = load_config(p, ["method.threshold_value=9e-1", "data.split=1_8"])
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.loss.eta, cfg.loss.scale) == (0.001, 0.0005, 0.5, 1.0)
    assert cfg.method.threshold_value == 0.9 and cfg.data.split == "1_8"
    assert load_config(None, ["optim.lr=5e-3"]).optim.lr == 0.005
    (tmp_path / "config.yaml").write_text(dump_yaml(cfg))
    assert resolved(load_config(tmp_path / "config.yaml")) == resolved(cfg)


@pytest.mark.parametrize("override, message", [
    ("optim.poly_power=-3", "'optim.poly_power' must be > 0, got -3.0"),
    ("optim.poly_power=0", "'optim.poly_power' must be > 0"),
    ("optim.lr=.inf", "'optim.lr' must be finite"),
    ("optim.momentum=.nan", "'optim.momentum' must be finite"),
    ("optim.momentum=1.5", "'optim.momentum' must be in [0, 1)"),
    ("optim.weight_decay=.nan", "'optim.weight_decay' must be finite"),
    ("optim.weight_decay=-1e-4", "'optim.weight_decay' must be >= 0"),
    ("optim.head_lr_mult=0", "'optim.head_lr_mult' must be > 0"),
    ("seed=-1", "'seed' must be in [0, 2**63 - 1]"),
    ("seed=9223372036854775808", "'seed' must be in [0, 2**63 - 1]"),
    ("data.scale_range=[1, .inf]", "'data.scale_range' must be finite"),
    ("data.scale_range=[2, 1]", "0 < low <= high"),
    ("data.crop_size=100000000", "'data.crop_size' must be in [17, 4096]"),
    ("data.crop_size=16", "'data.crop_size' must be in [17, 4096]"),
    ("eval.crop_size=8", "'eval.crop_size' must be in [17, 4096]"),
    ("optim=1", "override 'optim=1': 'optim' is a section; set one of its keys, e.g. optim.epochs=..."),
])
def test_every_numeric_setting_is_checked_when_the_config_is_read(override, message):
    with pytest.raises(ConfigError) as exc:
        load_config(None, [override])
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_a_yaml_alias_bomb_is_refused_before_it_grows(tmp_path):
    p = tmp_path / "bomb.yaml"
    nine = ", ".join(['"lol"'] * 9)
    p.write_text(f"name:\n  - &l0 [{nine}]\n" + "".join(
        f"  - &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]\n" for i in range(1, 9)))  # 9**9 strings once expanded
    with pytest.raises(ConfigError) as exc:
        load_config(p)
    assert str(exc.value) == f"{p}:3:10: an alias (*l0) repeats a value; configs take no aliases: write the value out"
    with pytest.raises(ConfigError, match=r"an alias \(\*a\) repeats a value"):
        load_config(None, ["optim.lr=[&a 1, *a]"])


def test_a_huge_value_is_cut_in_the_message(tmp_path):
    p = tmp_path / "long.yaml"
    p.write_text("name: [" + ", ".join(["lol"] * 100_000) + "]\n")
    with pytest.raises(ConfigError) as exc:
        load_config(p)
    assert str(exc.value).startswith("config key 'name' must be a string, got ['lol', 'lol'")
    assert str(exc.value).endswith(" (700,000 characters)") and len(str(exc.value)) < 250


def test_a_long_base_chain_a_huge_file_and_a_link_loop_are_refused(tmp_path):
    (tmp_path / "c0.yaml").write_text("seed: 1\n")
    for i in range(1, 1200):
        (tmp_path / f"c{i}.yaml").write_text(f"base: c{i - 1}.yaml\n")
    assert load_config(tmp_path / "c16.yaml").seed == 1  # 16 bases
    with pytest.raises(ConfigError, match=rf"config {tmp_path / 'c1199.yaml'}: its base: chain goes more than 16 bases deep"):
        load_config(tmp_path / "c1199.yaml")
    big = tmp_path / "big.yaml"
    big.write_text("# " + "x" * 2_000_000 + "\n")
    with pytest.raises(ConfigError, match=rf"config {big} is 2,000,003 bytes, more than a config's 1,000,000"):
        load_config(big)
    (tmp_path / "loop.yaml").symlink_to("loop.yaml")
    with pytest.raises(ConfigError, match=rf"config {tmp_path / 'loop.yaml'} is a symbolic link that leads back to "
                                          "itself"):
        load_config(tmp_path / "loop.yaml")


def test_the_smallest_crop_follows_the_output_stride():
    assert load_config(None, ["data.crop_size=17", "eval.crop_size=17"]).data.crop_size == 17
    with pytest.raises(ConfigError, match=r"'data.crop_size' must be in \[33, 4096\]"):
        load_config(None, ["model.output_stride=16", "data.crop_size=32"])


def test_a_config_that_is_a_folder_or_not_utf8_names_the_file(tmp_path):
    with pytest.raises(ConfigError, match=rf"config {CONFIG_DIR} is a folder; name a YAML file, e.g. {CONFIG_DIR}/"):
        load_config(CONFIG_DIR)
    p = tmp_path / "latin1.yaml"
    p.write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=rf"config {p} is not UTF-8 text \(byte 0xe9 at offset 9\); save it as UTF-8"):
        load_config(p)
    p.write_bytes(b"\xef\xbb\xbfname: bom\n")  # a byte-order mark is fine
    assert load_config(p).name == "bom"


def test_a_config_built_in_code_is_checked_like_one_read_from_yaml():
    with pytest.raises(ConfigError, match="'seed' must be in"):
        TrainConfig(seed=-1)
    with pytest.raises(ConfigError, match="'eval.crop_size' must be in"):
        dataclasses.replace(TrainConfig(), eval=dataclasses.replace(TrainConfig().eval, crop_size=5))


def test_flatten_is_the_inverse_of_the_sections():
    r = resolved(TrainConfig())
    flat = flatten(r)
    assert flat["optim.lr"] == r["optim"]["lr"] and flat["seed"] == r["seed"]
    assert len(flat) == sum(len(v) if isinstance(v, dict) else 1 for v in r.values())
