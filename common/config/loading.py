"""Loading a DermFed configuration: presets, YAML files, `key=value` overrides, and errors worded for people.

A run is described by a YAML preset from `configs/` plus `key=value` overrides from the
command line (dotted for nested keys: `data.root=/data/ham`). Unknown keys and out-of-range
values are errors that name the key and what is allowed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import yaml
from pydantic import BaseModel, ValidationError

from common.config.schema import ConfigError, DermFedConfig, _migrate_flat_vae_keys

PROJECT_ROOT = Path(__file__).resolve().parents[2]
PRESET_DIR = PROJECT_ROOT / "configs"


def resolve_preset_path(preset: str | Path) -> Path:
    """Accept a path to a YAML file or a bare preset name such as `demo`."""
    candidate = Path(preset)
    if candidate.is_file():
        return candidate
    if (PROJECT_ROOT / candidate).is_file():  # e.g. "configs/demo.yaml" from another working directory
        return PROJECT_ROOT / candidate
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
    return sorted([*model.model_fields, *_subsections(model)])


def _subsections(model: type[BaseModel]) -> dict[str, type[BaseModel]]:
    """Sections found by name at run time (the objectives' `model.<name>`), beside the declared fields."""
    found = getattr(model, "subsections", None)
    return found() if callable(found) else {}


def _child_section(model: type[BaseModel], part: str) -> Optional[type[BaseModel]]:
    field = model.model_fields.get(part)
    if field is not None:
        annotation = field.annotation
        return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return _subsections(model).get(part)


def _apply_override(tree: dict[str, Any], path: list[str], value: Any) -> None:
    model: type[BaseModel] = DermFedConfig
    node = tree
    for depth, part in enumerate(path):
        dotted = ".".join(path[: depth + 1])
        if part not in model.model_fields and part not in _subsections(model):
            prefix = ".".join(path[:depth])
            where = f" in section {prefix!r}" if prefix else ""
            raise ConfigError(
                f"unknown config key {dotted!r}{where}; allowed: {', '.join(_allowed_keys(model))}"
            )
        child = _child_section(model, part)
        is_section = child is not None
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
        model = child


def _describe_error(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            section = _section_model(err["loc"][:-1])
            allowed = ", ".join(_allowed_keys(section)) if section else "?"
            lines.append(f"unknown config key {key!r}; allowed: {allowed}")
        else:
            value = err.get("input")
            got = f" (got {value!r})" if err["loc"] and not isinstance(value, (dict, list)) else ""
            message = err["msg"].removeprefix("Value error, ")
            lines.append(f"{key}: {message}{got}")
    return "invalid configuration: " + "; ".join(lines) if len(lines) == 1 else \
        "invalid configuration:\n  " + "\n  ".join(lines)


def _section_model(loc: tuple[Any, ...]) -> Optional[type[BaseModel]]:
    model: type[BaseModel] = DermFedConfig
    for part in loc:
        child = _child_section(model, str(part))
        if child is None:
            return None
        model = child
    return model


def build_config(tree: dict[str, Any]) -> DermFedConfig:
    """Validate a plain mapping into a config, with errors that name the key."""
    try:
        return DermFedConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_describe_error(exc)) from None


class _StrictLoader(yaml.SafeLoader):
    """YAML that refuses a key given twice in one mapping (plain YAML silently keeps the last)."""


def _mapping_without_duplicates(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} appears twice (lines {seen[key] + 1} and {key_node.start_mark.line + 1})",
                key_node.start_mark)
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def read_yaml(path: Path) -> Any:
    """A YAML file, with errors that name the file, line and column and say what is wrong."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    try:
        return yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        line = text.splitlines()[mark.line] if mark and mark.line < len(text.splitlines()) else ""
        hint = " (YAML indents with spaces, never tabs)" if "\t" in line else ""
        raise ConfigError(f"{path}{where}: {problem}{hint}") from None


def load_config(preset: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> DermFedConfig:
    """Read a preset (or the defaults when None) and apply `key=value` overrides."""
    tree: dict[str, Any] = {}
    if preset is not None:
        path = resolve_preset_path(preset)
        loaded = read_yaml(path) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path} must hold a YAML mapping at its top level")
        tree = loaded
    return _overridden(tree, overrides)


def apply_overrides(config: DermFedConfig, overrides: list[str] | tuple[str, ...]) -> DermFedConfig:
    """A copy of `config` with `key=value` overrides applied (validated like the command line)."""
    return _overridden(config.model_dump(mode="json"), overrides)


def _overridden(tree: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> DermFedConfig:
    if isinstance(tree.get("model"), dict):  # an old run's flat model keys first, so `model.vae.*` overrides apply to them
        tree = {**tree, "model": _migrate_flat_vae_keys(dict(tree["model"]))}
    for text in overrides:
        key_path, value = parse_override(text)
        _apply_override(tree, key_path, value)
    return build_config(tree)


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
