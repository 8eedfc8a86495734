"""The one typed, validated DermFed configuration.

`schema` holds its sections, `loading` reads presets and overrides with errors that name the
key, `transport` writes and sends it. Everything is re-exported here: `from common.config import X`.
"""

from common.config.loading import (
    PRESET_DIR,
    PROJECT_ROOT,
    ConfigError,
    apply_overrides,
    build_config,
    flatten_config,
    load_config,
    parse_override,
    read_yaml,
    resolve_preset_path,
)
from common.config.schema import (
    EXTERNAL_NAME,
    Artifact,
    AugmentConfig,
    DataConfig,
    DataFormat,
    DermFedConfig,
    DPConfig,
    EvaluationConfig,
    ExternalSetConfig,
    FederationConfig,
    ModelConfig,
    StudyConfig,
    SynthConfig,
    TrainConfig,
    timm_convnext_names,
)
from common.config.transport import (
    ConfigPerRun,
    config_from_json,
    config_of_run,
    config_to_json,
    config_to_yaml,
    flower_run_config,
    run_config_argument,
    toml_string,
    toml_value,
    write_config,
)

__all__ = [
    "ConfigPerRun", "EXTERNAL_NAME", "PRESET_DIR", "PROJECT_ROOT", "Artifact", "AugmentConfig", "ConfigError",
    "DPConfig", "DataConfig", "DataFormat", "DermFedConfig", "EvaluationConfig", "ExternalSetConfig",
    "FederationConfig", "ModelConfig", "StudyConfig", "SynthConfig", "TrainConfig", "apply_overrides", "build_config",
    "config_from_json", "config_of_run", "config_to_json", "config_to_yaml", "flatten_config", "flower_run_config",
    "load_config", "parse_override", "read_yaml", "resolve_preset_path", "run_config_argument",
    "timm_convnext_names", "toml_string", "toml_value", "write_config",
]
