import pytest
import yaml

from common.config import PRESET_DIR, ConfigError, flatten_config, load_config, write_config


@pytest.mark.parametrize("preset", ["paper", "demo", "smoke"])
def test_every_preset_loads(preset):
    config = load_config(preset)
    assert config.data.image_size >= 32


def test_paper_preset_is_the_papers_setting():
    assert load_config("paper").data.image_size == 224


def test_dotted_override_sets_nested_key_with_yaml_types():
    config = load_config("smoke", ["data.root=/x/y", "data.image_size=64", "synth.shortcut=false", "seed=7"])
    assert config.data.root == "/x/y"
    assert config.data.image_size == 64
    assert config.synth.shortcut is False
    assert config.seed == 7


def test_unknown_key_names_key_and_allowed_keys():
    with pytest.raises(ConfigError) as err:
        load_config("smoke", ["data.rooot=/x"])
    text = str(err.value)
    assert "data.rooot" in text and "root" in text and "image_size" in text


def test_unknown_top_level_key_in_preset_is_an_error(tmp_path):
    preset = tmp_path / "bad.yaml"
    preset.write_text("seed: 1\nlearning_rate: 3\n")
    with pytest.raises(ConfigError, match="learning_rate"):
        load_config(preset)


def test_out_of_range_value_names_key_and_bound():
    with pytest.raises(ConfigError) as err:
        load_config("smoke", ["data.image_size=8"])
    assert "data.image_size" in str(err.value) and "32" in str(err.value)


def test_bad_choice_lists_allowed_values():
    with pytest.raises(ConfigError) as err:
        load_config("smoke", ["data.format=dicom"])
    text = str(err.value)
    assert "data.format" in text
    for allowed in ("ham10000", "isic2019", "isic-gt", "isic2020", "folder", "synthetic"):
        assert allowed in text


def test_override_of_a_section_or_malformed_override_is_an_error():
    with pytest.raises(ConfigError, match="section"):
        load_config("smoke", ["data=3"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config("smoke", ["data.root"])
    with pytest.raises(ConfigError, match="not a section"):
        load_config("smoke", ["seed.value=3"])


def test_unknown_preset_lists_presets():
    with pytest.raises(ConfigError, match="smoke"):
        load_config("nope")


def test_written_config_reloads_to_the_same_config(tmp_path):
    config = load_config("demo", ["data.root=/somewhere", "seed=3"])
    path = write_config(config, tmp_path)
    assert load_config(path) == config
    assert yaml.safe_load(path.read_text())["data"]["root"] == "/somewhere"


def test_every_key_is_overridable():
    config = load_config("smoke")
    for key, value in flatten_config(config).items():
        if isinstance(value, list):
            continue
        assert load_config("smoke", [f"{key}={value if value is not None else ''}"]) == config, key


def test_presets_directory_has_the_three_presets():
    assert {p.stem for p in PRESET_DIR.glob("*.yaml")} >= {"paper", "demo", "smoke"}


def test_cross_key_rules_are_checked():
    with pytest.raises(ConfigError, match="multiple of 32"):
        load_config("smoke", ["data.image_size=48"])
    with pytest.raises(ConfigError, match="drop_path_rate"):
        load_config("smoke", ["dp.enabled=true", "dp.noise_multiplier=1", "model.drop_path_rate=0.1"])
    with pytest.raises(ConfigError, match="noise_multiplier or dp.target_epsilon"):
        load_config("smoke", ["dp.enabled=true"])


def test_one_run_config_carries_the_resolved_config_through_flowers_own_parser(tmp_path):
    """`flower_run_config` (simulate and deploy sign) read back by Flower's `--run-config` parser, then by the apps:
    the same keys and values, and exactly the resolved config, even with quotes and spaces in a value."""
    from flwr.common.config import parse_config_args

    from common.config import config_of_run, flower_run_config, run_config_argument

    config = load_config("smoke", [f'data.root={tmp_path}/a "quoted" folder', "train.lr=0.1"])
    built = flower_run_config(preset="smoke", run_dir=str(tmp_path / "run"), config=config, site_names=["a", "b"],
                              stop_after_round=1)
    parsed = parse_config_args([run_config_argument(built)])
    assert parsed == built
    assert config_of_run(parsed) == config
    preset_only = parse_config_args([run_config_argument(flower_run_config(preset="smoke", run_dir="/r",
                                                                           overrides=["train.lr=0.1"]))])
    bare = config_of_run(preset_only)  # a bare `flwr run`'s preset: its relative paths start in Flower's home
    from common.config.transport import anchored_at, bare_run_folder

    assert bare == anchored_at(load_config("smoke", ["train.lr=0.1"]), bare_run_folder())
    assert bare.data.root == str(bare_run_folder() / "data" / "smoke") and bare.train.lr == 0.1
