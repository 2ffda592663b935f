"""Run config: dotted-key errors, method presets, `--set` overrides, YAML files, round trips."""

import pytest

from training.config import (
    METHOD_PRESETS,
    ConfigError,
    MoEConfig,
    QuantConfig,
    RunConfig,
    SideConfig,
    TrainConfig,
    config_from_dict,
    load_config,
)


def config_error(overrides=(), path=None) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(path, list(overrides))
    return str(e.value)


def test_defaults_validate_and_match_the_design():
    cfg = load_config()
    assert cfg.train.method == "mp_ismoe" and cfg.quant.enabled and cfg.side.enabled and cfg.moe.enabled
    assert (cfg.quant.bits, cfg.quant.layernorm, cfg.quant.requant_base) == (8, "frozen", "reference")
    assert (cfg.moe.num_experts, cfg.moe.top_k, cfg.moe.routing) == (8, 2, "renorm")
    assert (cfg.moe.prior_mode, cfg.moe.prior_init, cfg.moe.salient, cfg.moe.upcycle, cfg.moe.dispatch) == (
        "logits",
        "kmeans",
        "auto",
        "noise",
        "sparse",
    )
    assert cfg.side.recompute
    assert (cfg.moe.load_balance_coef, cfg.moe.z_loss_coef, cfg.side.gate_temperature) == (1e-2, 1e-3, 0.1)


@pytest.mark.parametrize(
    "override, key",
    [
        ("quant.bitz=8", "quant.bitz"),
        ("trian.epochs=3", "trian"),
        ("bogus=1", "bogus"),
        ("moe.experts=4", "moe.experts"),
    ],
)
def test_unknown_key_names_the_dotted_key(override, key):
    msg = config_error([override])
    assert msg.startswith(f"{key}:") and "unknown key" in msg


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.epochs=three", "train.epochs"),
        ("train.epochs=2.5", "train.epochs"),
        ("train.epochs=true", "train.epochs"),  # a bool is not an integer
        ("quant.enabled=3", "quant.enabled"),
        ("train.lr=fast", "train.lr"),
        ("train.lr=[1]", "train.lr"),
        ("train.head_lr=abc", "train.head_lr"),  # float | None
        ("data.text_pair_column=5", "data.text_pair_column"),  # str | None
        ("side.layers=[1, x]", "side.layers[1]"),
        ("side.layers=3", "side.layers"),
        ("backbone=5", "backbone"),
        ("name=[a]", "name"),
    ],
)
def test_wrong_type_names_the_dotted_key(override, key):
    assert config_error([override]).startswith(f"{key}:")


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["moe.top_k=9"], "moe.top_k"),
        (["moe.num_experts=2", "moe.top_k=3"], "moe.top_k"),
        (["quant.bits=6"], "quant.bits"),
        (["quant.layernorm=partial"], "quant.layernorm"),
        (["quant.requant_fraction=1.5"], "quant.requant_fraction"),
        (["data.val_fraction=0.7"], "data.val_fraction"),
        (["data.max_examples=5"], "data.max_examples"),
        (["train.lr=-1"], "train.lr"),
        (["train.lr=0"], "train.lr"),
        (["train.epochs=0"], "train.epochs"),
        (["train.device=tpu"], "train.device"),
        (["side.layers=[]"], "side.layers"),
        (["side.layers=[0, 1]"], "side.layers"),
        (["side.dropout=1.0"], "side.dropout"),
        (["side.gate_temperature=0"], "side.gate_temperature"),
        (["backbone.max_length=4"], "backbone.max_length"),
        (["backbone.tiny_hidden=30"], "backbone.tiny_hidden"),
        (["moe.routing=softmax"], "moe.routing"),
        (["moe.expert_types=[ffn, bogus, ffn, ffn]"], "moe.expert_types"),
        (["moe.expert_types=[ffn, ffn]"], "moe.expert_types"),
        (["train.method=adapters"], "train.method"),
    ],
)
def test_impossible_value_names_the_dotted_key(overrides, key):
    assert config_error(overrides).startswith(f"{key}:")


def test_lora_preset_turns_off_side_and_quant():
    cfg = load_config(overrides=["train.method=lora"])
    assert not cfg.side.enabled and not cfg.quant.enabled and not cfg.moe.enabled


def test_lst_preset_keeps_the_side_without_moe_or_quant():
    cfg = load_config(overrides=["train.method=lst"])
    assert cfg.side.enabled and not cfg.quant.enabled and not cfg.moe.enabled


@pytest.mark.parametrize(
    "method, override, key",
    [
        ("lora", "side.enabled=true", "side.enabled"),
        ("lora", "quant.enabled=true", "quant.enabled"),
        ("full_ft", "side.enabled=true", "side.enabled"),
        ("bitfit", "quant.enabled=true", "quant.enabled"),
        ("lst", "moe.enabled=true", "moe.enabled"),
    ],
)
def test_a_value_contradicting_the_method_is_an_error_naming_it(method, override, key):
    msg = config_error([f"train.method={method}", override])
    assert msg.startswith(f"{key}:") and method in msg


def test_a_value_agreeing_with_the_method_is_accepted():
    cfg = load_config(overrides=["train.method=lora", "side.enabled=false", "quant.enabled=false"])
    assert cfg.train.method == "lora"


def test_every_method_preset_builds():
    for method in METHOD_PRESETS:
        assert load_config(overrides=[f"train.method={method}"]).train.method == method


def test_fine_tuning_methods_cannot_be_built_with_a_side_network_directly():
    with pytest.raises(ConfigError, match="^train.method"):
        RunConfig(train=TrainConfig(method="full_ft"))


def test_disabling_the_side_disables_the_moe():
    assert not load_config(overrides=["side.enabled=false", "quant.enabled=false", "train.method=full_ft"]).moe.enabled


def test_overrides_are_parsed_as_yaml_values():
    cfg = load_config(
        overrides=[
            "train.epochs=5",
            "side.layers=[3, 1]",
            "name=a=b",
            "data.text_pair_column=null",
            "quant.enabled=false",
            " train.batch_size = 7",
            "data.dataset=x.csv",
            "train.max_steps=~",
        ]
    )
    assert cfg.train.epochs == 5 and cfg.side.layers == [3, 1] and cfg.name == "a=b"
    assert cfg.data.text_pair_column is None and cfg.quant.enabled is False
    assert cfg.train.batch_size == 7 and cfg.data.dataset == "x.csv" and cfg.train.max_steps is None


def test_later_overrides_win():
    assert load_config(overrides=["train.epochs=5", "train.epochs=2"]).train.epochs == 2


@pytest.mark.parametrize("overrides", [["train.lr"], ["=5"], ["train.lr=1", "train.lr.x=2"]])
def test_malformed_override_is_a_config_error(overrides):
    with pytest.raises(ConfigError):
        load_config(overrides=overrides)


def test_override_into_a_scalar_is_an_error_naming_the_path():
    assert config_error(["name=a", "name.x=1"]).startswith("name.x:")


def test_scientific_notation_without_a_dot_is_a_float(tmp_path):
    """YAML 1.1 reads `3e-3` as a string; the config must still accept it as a number."""
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  lr: 3e-3\n  head_lr: 1e-2\nmoe:\n  z_loss_coef: 1e-3\n")
    cfg = load_config(p)
    assert cfg.train.lr == pytest.approx(3e-3) and isinstance(cfg.train.lr, float)
    assert cfg.train.head_lr == pytest.approx(1e-2) and cfg.moe.z_loss_coef == pytest.approx(1e-3)
    assert load_config(overrides=["train.lr=3e-3"]).train.lr == pytest.approx(3e-3)


def test_an_integer_is_accepted_where_a_float_is_expected():
    cfg = load_config(overrides=["train.lr=1", "train.weight_decay=0"])
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float) and isinstance(cfg.train.weight_decay, float)


def test_yaml_file_with_overrides_on_top(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: x\ntrain:\n  epochs: 7\n  batch_size: 4\n")
    cfg = load_config(p, ["train.epochs=2"])
    assert (cfg.name, cfg.train.epochs, cfg.train.batch_size) == ("x", 2, 4)


def test_missing_yaml_file(tmp_path):
    msg = config_error(path=tmp_path / "nope.yaml")
    assert "nope.yaml" in msg and "does not exist" in msg


def test_invalid_yaml_file(tmp_path):
    p = tmp_path / "broken.yaml"
    p.write_text("train:\n  epochs: [1,\n")
    msg = config_error(path=p)
    assert "broken.yaml" in msg and "not valid YAML" in msg


def test_yaml_file_that_is_not_a_mapping(tmp_path):
    p = tmp_path / "list.yaml"
    p.write_text("- a\n- b\n")
    assert "list.yaml" in config_error(path=p)


def test_empty_yaml_file_gives_the_defaults(tmp_path):
    p = tmp_path / "empty.yaml"
    p.write_text("# nothing\n")
    assert load_config(p) == load_config()


def test_unknown_key_in_a_yaml_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("side:\n  reduktion: 4\n")
    assert config_error(path=p).startswith("side.reduktion:")


def test_shipped_configs_load():
    from pathlib import Path

    for p in sorted(Path(__file__).resolve().parents[2].glob("configs/*.yaml")):
        load_config(p)


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["train.method=lora"],
        ["train.method=lst", "side.layers=[2]"],
        ["moe.num_experts=4", "moe.expert_types=[ffn, lowrank, ffn, channel_attn]"],
    ],
)
def test_round_trip_through_a_plain_dict(overrides):
    """The checkpoint stores cfg.to_dict(); a later stage must rebuild the same config from it."""
    cfg = load_config(overrides=overrides)
    again = config_from_dict(cfg.to_dict())
    assert again == cfg and again.to_dict() == cfg.to_dict()


def test_sections_check_themselves_on_construction():
    with pytest.raises(ConfigError, match="^quant.bits"):
        QuantConfig(bits=2)
    with pytest.raises(ConfigError, match="^moe.top_k"):
        MoEConfig(num_experts=2, top_k=3)


def test_train_section_that_is_not_a_mapping_is_a_config_error(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train: 5\n")
    assert config_error(path=p).startswith("train:")


def test_preset_section_that_is_not_a_mapping_is_a_config_error():
    with pytest.raises(ConfigError, match="^quant"):
        config_from_dict({"train": {"method": "lst"}, "quant": 5})


def test_cli_reports_a_config_error_with_exit_code_2(tmp_path, capsys):
    from training.cli import main

    assert main(["--out", str(tmp_path / "run"), "--set", "quant.bitz=8"]) == 2
    assert "quant.bitz" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("method", ["full_ft", "lora", "bitfit", "linear_probe", "lst"])
def test_a_method_preset_decides_over_the_config_file(method):
    """configs/default.yaml spells out quant.enabled: true; switching method must not need three more flags."""
    cfg = load_config("configs/default.yaml", [f"train.method={method}"])
    assert cfg.train.method == method and not cfg.quant.enabled and not cfg.moe.enabled
    assert cfg.side.enabled == (method == "lst")


def test_only_a_value_set_for_this_run_can_contradict_the_preset():
    with pytest.raises(ConfigError, match="quant.enabled: method full_ft requires False, this run sets True"):
        load_config("configs/default.yaml", ["train.method=full_ft", "quant.enabled=true"])
    with pytest.raises(ConfigError, match="side.enabled: method mp_ismoe requires True, this run sets False"):
        load_config(None, ["side.enabled=false"])  # mp_ismoe needs its side network
    with pytest.raises(ConfigError, match="moe.enabled: method lst requires False, this run sets True"):
        load_config(None, ["train.method=lst", "moe.enabled=true"])
    with pytest.raises(ConfigError, match="moe.enabled: needs side.enabled"):  # never silently switched off
        RunConfig(
            train=TrainConfig(method="full_ft"),
            quant=QuantConfig(enabled=False),
            side=SideConfig(enabled=False),
            moe=MoEConfig(enabled=True),
        )
