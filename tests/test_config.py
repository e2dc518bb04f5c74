"""Config loading, overrides, validation messages and the recipes in configs/."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from recallk.config import (
    Config,
    DataConfig,
    config_from_dict,
    config_to_dict,
    load_config,
    save_config,
    validate_config,
)
from recallk.errors import ConfigError

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def config_error(*args, **kwargs) -> str:
    """Run load_config expecting a ConfigError; return its message after checking it is one line."""
    with pytest.raises(ConfigError) as info:
        load_config(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_recipes_exist_for_every_paper_setting():
    names = {p.stem for p in CONFIGS}
    for dataset in ("sop", "inat2018", "vehicleid", "cub", "cars"):
        assert {f"{dataset}_resnet50", f"{dataset}_vit_b16", f"{dataset}_vit_b32"} <= names
    assert "omniglot" in names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_recipe_loads_validates_and_round_trips(path, tmp_path):
    cfg = load_config(path)
    assert cfg.name == path.stem
    assert cfg.data.batch_size % cfg.data.samples_per_class == 0
    saved = save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(saved) == cfg


def test_paper_recipes_follow_the_paper():
    sop = load_config(CONFIGS[0].parent / "sop_resnet50.yaml")
    assert (sop.data.batch_size, sop.data.samples_per_class, sop.train.chunk_size) == (4000, 4, 200)
    assert (sop.model.embed_dim, sop.model.pooling, sop.model.layernorm, sop.optim.name) == (512, "gem", True, "adam")
    vit = load_config(CONFIGS[0].parent / "cub_vit_b16.yaml")
    assert (vit.model.pooling, vit.optim.name, vit.data.image_size) == ("cls", "adamw", 224)
    for dataset in ("sop", "inat2018", "vehicleid", "cub", "cars"):
        b16, b32 = (load_config(CONFIGS[0].parent / f"{dataset}_vit_b{size}.yaml") for size in (16, 32))
        assert b32.model.backbone == "vit_base_patch32_224.augreg_in21k" and b16.data.transform == "timm"
        # the ViT-B/32 recipe is the ViT-B/16 one with the other backbone
        same_backbone = dataclasses.replace(b32.model, backbone=b16.model.backbone)
        assert dataclasses.replace(b32, name=b16.name, model=same_backbone) == b16


def test_defaults_are_valid():
    cfg = load_config(None)
    assert cfg == Config()
    validate_config(cfg)


def test_overrides_are_parsed_as_yaml_scalars(tmp_path):
    path = write(tmp_path, "optim:\n  lr: 1e-4\n")
    cfg = load_config(
        path,
        ["optim.lr=1e-5", "data.batch_size=392", "eval.k=[1, 10]", "data.split_val=null", "loss.simix=true",
         "loss.params.margin=0.2"],
    )
    assert cfg.optim.lr == pytest.approx(1e-5) and isinstance(cfg.optim.lr, float)
    assert cfg.data.batch_size == 392
    assert cfg.eval.k == (1, 10)
    assert cfg.data.split_val is None
    assert cfg.loss.simix is True
    assert cfg.loss.params == {"margin": 0.2}


def test_exponent_without_dot_in_file_is_a_float(tmp_path):
    assert load_config(write(tmp_path, "optim:\n  lr: 2e-4\n")).optim.lr == pytest.approx(2e-4)


def test_set_values_are_used_verbatim_and_win_over_overrides():
    cfg = load_config(None, ["data.data_dir=/a"], {"data.data_dir": "yes", "train.device": "cpu"})
    assert cfg.data.data_dir == "yes"  # not turned into a bool
    assert cfg.train.device == "cpu"


def test_scalar_for_a_list_field_becomes_a_one_item_tuple():
    assert load_config(None, ["data.split_test=test_small"]).data.split_test == ("test_small",)


def test_integer_for_a_float_field_is_converted():
    cfg = load_config(None, ["optim.lr=1"])
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)


def test_unknown_key_names_dotted_key_suggestion_and_allowed_keys(tmp_path):
    path = write(tmp_path, "optim:\n  lrr: 0.1\n")
    message = config_error(path)
    assert "'optim.lrr'" in message and str(path) in message
    assert "did you mean 'optim.lr'" in message
    assert "allowed keys in 'optim':" in message and "weight_decay" in message


def test_unknown_top_level_key_suggests_the_section():
    message = config_error(None, ["lr=0.1"])
    assert "unknown key 'lr'" in message and "did you mean 'optim.lr'" in message
    assert "override 'lr=0.1'" in message


def test_wrong_type_names_key_expected_type_and_value(tmp_path):
    message = config_error(write(tmp_path, "data:\n  batch_size: big\n"))
    assert "'data.batch_size'" in message and "expected an integer" in message and "'big'" in message


def test_bool_is_not_an_integer():
    message = config_error(None, ["train.epochs=true"])
    assert "'train.epochs'" in message and "expected an integer" in message


def test_list_items_are_type_checked():
    message = config_error(None, ["eval.k=[1, two]"])
    assert "'eval.k'" in message and "a list of integers" in message


def test_enum_lists_the_allowed_values():
    message = config_error(None, ["train.amp=fp32"])
    assert "'train.amp'" in message and "'fp32'" in message
    assert "'none', 'bf16', 'fp16'" in message


def test_malformed_yaml_names_file_line_and_column(tmp_path):
    path = write(tmp_path, "data:\n  batch_size: 4000\n samples_per_class: 4\n")
    message = config_error(path)
    assert "malformed YAML" in message and str(path) in message
    assert "line 3, column 2" in message


def test_duplicate_keys_are_rejected(tmp_path):
    message = config_error(write(tmp_path, "optim:\n  lr: 1.0\n  lr: 2.0\n"))
    assert "duplicate key 'lr'" in message and "line 3" in message


def test_section_must_be_a_mapping(tmp_path):
    message = config_error(write(tmp_path, "optim: 3\n"))
    assert "section 'optim'" in message and "mapping" in message


def test_top_level_must_be_a_mapping(tmp_path):
    assert "top level" in config_error(write(tmp_path, "- 1\n- 2\n"))


def test_empty_file_gives_defaults(tmp_path):
    assert load_config(write(tmp_path, "# nothing yet\n")) == Config()


def test_missing_file_and_directory():
    assert "does not exist" in config_error("no/such/config.yaml")
    assert "is a directory" in config_error(Path(__file__).parent)


def test_batch_size_must_be_a_multiple_of_samples_per_class():
    message = config_error(None, ["data.batch_size=4001", "data.samples_per_class=4"])
    assert "data.batch_size=4001" in message and "data.samples_per_class=4" in message
    assert "4000 or 4004" in message


def test_batch_needs_two_classes():
    assert "single class" in config_error(None, ["data.batch_size=4", "data.samples_per_class=4"])


def test_rsk_needs_positives():
    assert "samples_per_class=1" in config_error(None, ["data.samples_per_class=1"])


def test_chunk_size_must_be_positive():
    assert "'train.chunk_size' must be > 0" in config_error(None, ["train.chunk_size=0"])


def test_step_schedule_needs_steps_before_the_last_epoch():
    assert "step_epochs" in config_error(None, ["optim.schedule=step"])
    message = config_error(None, ["optim.schedule=step", "optim.step_epochs=[5]", "train.epochs=5"])
    assert "train.epochs=5" in message


def test_k_values_must_increase():
    assert "increasing positive" in config_error(None, ["loss.k=[4, 2]"])


def test_simix_only_with_rsk():
    message = config_error(None, ["loss.simix=true", "loss.name=triplet"])
    assert "loss.simix" in message and "rsk" in message


def test_override_syntax_errors():
    assert "dotted.key=value" in config_error(None, ["optim.lr"])
    assert "not a section" in config_error(None, ["optim.lr=0.1", "optim.lr.x=1"])
    assert "cannot parse" in config_error(None, ["eval.k=[1, 2"])


def test_config_from_dict_and_to_dict_round_trip():
    cfg = load_config(None, ["model.widths=[8, 16]", "data.split_test=[a, b]", "loss.params.margin=0.1"])
    plain = config_to_dict(cfg)
    assert plain["model"]["widths"] == [8, 16] and plain["data"]["split_test"] == ["a", "b"]
    assert config_from_dict(plain) == cfg


def test_validate_config_checks_configs_built_in_code():
    cfg = dataclasses.replace(Config(), data=DataConfig(batch_size=10, samples_per_class=4))
    with pytest.raises(ConfigError, match="8 or 12"):
        validate_config(cfg)


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)
