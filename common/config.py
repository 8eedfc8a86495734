"""The one typed, validated DermFed configuration.

A run is described by a YAML preset from `configs/` plus `key=value` overrides from the
command line (dotted for nested keys: `data.root=/data/ham`). Unknown keys and out-of-range
values are errors that name the key and what is allowed, so that a typo never silently falls
back to a default. The resolved configuration is written next to every run's outputs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PRESET_DIR = PROJECT_ROOT / "configs"

DataFormat = Literal["ham10000", "isic2019", "isic-gt", "isic2020", "folder", "synthetic"]
Artifact = Literal["ruler", "hair", "bubbles", "vignette", "ink"]


class ConfigError(ValueError):
    """A configuration problem, worded for the person who typed the command."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    """Where the images are and how they are read, split and partitioned."""

    format: DataFormat = Field("synthetic", description="layout of data.root")
    root: Optional[str] = Field(None, description="folder with the images (and metadata CSV)")
    metadata_csv: Optional[str] = Field(
        None, description="metadata/ground-truth CSV; default: the official file name in data.root"
    )
    ham_metadata_csv: Optional[str] = Field(
        None,
        description="isic2019 only: HAM10000_metadata.csv that splits the HAM images into "
        "FLamby's four HAM centres; default: data.root/HAM10000_metadata.csv if present",
    )
    image_size: int = Field(64, ge=32, le=512, description="side of the square model input")
    min_image_side: int = Field(32, ge=1, description="images with a smaller side are skipped")
    non_rgb: Literal["skip", "convert"] = Field(
        "skip", description="grayscale/RGBA/CMYK/16-bit images: skip them or convert to RGB"
    )
    cache_dir: str = Field(".cache/dermfed", description="preprocessing cache (memory-mapped)")
    use_cache: bool = Field(True, description="decode each JPEG once and keep resized arrays")
    val_fraction: float = Field(0.15, ge=0.0, lt=0.5)
    test_fraction: float = Field(0.15, ge=0.0, lt=0.5)
    partition: Literal["natural", "iid", "dirichlet"] = Field(
        "natural", description="how pooled data becomes simulated hospitals"
    )
    num_partitions: int = Field(4, ge=1, le=1000, description="hospitals for iid/dirichlet")
    dirichlet_alpha: float = Field(0.5, gt=0.0, description="label skew; small = more skewed")
    site: Optional[str] = Field(None, description="use only this site (local-only arm)")


class SynthConfig(_Section):
    """The embedded synthetic dermoscopy generator (the default data of the demo)."""

    num_sites: int = Field(4, ge=1, le=16)
    lesions_per_site: int = Field(40, ge=3)
    max_images_per_lesion: int = Field(2, ge=1, le=5)
    image_size: int = Field(128, ge=48, le=1024, description="side of the written JPEGs")
    classes: list[Literal["nv", "mel", "bkl"]] = Field(default_factory=lambda: ["nv", "mel", "bkl"])
    shortcut: bool = Field(False, description="make one artefact track a class in train/val only")
    shortcut_artifact: Artifact = "ruler"
    shortcut_class: Literal["nv", "mel", "bkl"] = "mel"
    shortcut_strength: float = Field(
        0.9, ge=0.5, le=1.0, description="P(artefact | shortcut class) = P(no artefact | other)"
    )
    test_fraction: float = Field(0.25, gt=0.0, lt=0.9, description="lesions in the test split")
    val_fraction: float = Field(0.15, ge=0.0, lt=0.5, description="lesions in the validation split")


class DermFedConfig(_Section):
    """Everything a DermFed run needs; one instance per run, written beside its outputs."""

    seed: int = Field(0, ge=0)
    output_dir: str = Field("runs", description="where run folders are created")
    run_name: Optional[str] = Field(None, description="run folder name; default: subcommand+time")
    data: DataConfig = Field(default_factory=DataConfig)
    synth: SynthConfig = Field(default_factory=SynthConfig)

    @model_validator(mode="after")
    def _check_shortcut_class(self) -> "DermFedConfig":
        if self.synth.shortcut and self.synth.shortcut_class not in self.synth.classes:
            raise ValueError(
                f"synth.shortcut_class={self.synth.shortcut_class!r} is not one of "
                f"synth.classes={self.synth.classes}"
            )
        return self


# ---------------------------------------------------------------------------------------------
# Loading, overriding, writing
# ---------------------------------------------------------------------------------------------


def resolve_preset_path(preset: str | Path) -> Path:
    """Accept a path to a YAML file or a bare preset name such as `demo`."""
    candidate = Path(preset)
    if candidate.is_file():
        return candidate
    named = PRESET_DIR / f"{preset}.yaml"
    if named.is_file():
        return named
    available = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
    raise ConfigError(f"config preset {str(preset)!r} not found; presets: {available} or a YAML path")


def parse_override(text: str) -> tuple[list[str], Any]:
    """`data.root=/x` -> (['data', 'root'], '/x'); values are read as YAML scalars."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value (e.g. data.root=/images)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def _allowed_keys(model: type[BaseModel]) -> list[str]:
    return sorted(model.model_fields)


def _apply_override(tree: dict[str, Any], path: list[str], value: Any) -> None:
    model: type[BaseModel] = DermFedConfig
    node = tree
    for depth, part in enumerate(path):
        dotted = ".".join(path[: depth + 1])
        if part not in model.model_fields:
            prefix = ".".join(path[:depth])
            where = f" in section {prefix!r}" if prefix else ""
            raise ConfigError(
                f"unknown config key {dotted!r}{where}; allowed: {', '.join(_allowed_keys(model))}"
            )
        annotation = model.model_fields[part].annotation
        is_section = isinstance(annotation, type) and issubclass(annotation, BaseModel)
        if depth == len(path) - 1:
            if is_section:
                raise ConfigError(f"{dotted!r} is a section; set one of its keys, e.g. {dotted}.KEY=VALUE")
            node[part] = value
            return
        if not is_section:
            raise ConfigError(f"{dotted!r} is not a section, so {'.'.join(path)!r} does not exist")
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted!r} must be a mapping in the preset")
        model = annotation


def _describe_error(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            section = _section_model(err["loc"][:-1])
            allowed = ", ".join(_allowed_keys(section)) if section else "?"
            lines.append(f"unknown config key {key!r}; allowed: {allowed}")
        else:
            lines.append(f"{key}: {err['msg']} (got {err.get('input')!r})")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def _section_model(loc: tuple[Any, ...]) -> Optional[type[BaseModel]]:
    model: type[BaseModel] = DermFedConfig
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return None
        model = field.annotation
    return model


def build_config(tree: dict[str, Any]) -> DermFedConfig:
    """Validate a plain mapping into a config, with errors that name the key."""
    try:
        return DermFedConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_describe_error(exc)) from None


def load_config(preset: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> DermFedConfig:
    """Read a preset (or the defaults when None) and apply `key=value` overrides."""
    tree: dict[str, Any] = {}
    if preset is not None:
        path = resolve_preset_path(preset)
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path} must hold a YAML mapping at its top level")
        tree = loaded
    for text in overrides:
        key_path, value = parse_override(text)
        _apply_override(tree, key_path, value)
    return build_config(tree)


def config_to_yaml(config: DermFedConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def write_config(config: DermFedConfig, folder: str | Path, name: str = "config.yaml") -> Path:
    """Write the resolved config beside a run's outputs, so the run can be reproduced."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(config_to_yaml(config))
    return path


def flatten_config(config: DermFedConfig) -> dict[str, Any]:
    """Dotted keys and values, e.g. {'data.root': None, ...}: what `dermfed config` lists."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            flat[prefix] = value

    walk("", config.model_dump(mode="json"))
    return flat
