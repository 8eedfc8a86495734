"""The self-supervised objectives, found by name (`model.objective`).

One module per objective, a subclass of `common.objectives.base.Objective` registered with
`@register_objective("name")` (solo-learn's METHODS dict, timm's `@register_model`). The package
imports its built-in objectives below; one registered from anywhere else (a test module, a plug-in)
works everywhere the same way, with its settings in the config section `model.<name>`.
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

from common.objectives.base import (
    ENCODER_PREFIX,
    SHARE_SCOPES,
    Objective,
    ObjectiveSettings,
    available_encoders,
    create_encoder,
    strip_wrapper_prefixes,
)

OBJECTIVES: dict[str, type[Objective]] = {}
_O = TypeVar("_O", bound=type[Objective])


def register_objective(name: str) -> Callable[[_O], _O]:
    """Class decorator: make an Objective subclass available as `model.objective=<name>`."""

    def register(cls: _O) -> _O:
        if not (isinstance(cls, type) and issubclass(cls, Objective)):
            raise TypeError(f"objective {name!r}: {cls!r} is not a subclass of common.objectives.base.Objective")
        if not issubclass(cls.Settings, ObjectiveSettings):
            raise TypeError(f"objective {name!r}: its Settings must subclass ObjectiveSettings")
        if "total" not in cls.terms:
            raise TypeError(f"objective {name!r}: its terms must include 'total' (the loss that is optimised)")
        if name in OBJECTIVES and OBJECTIVES[name] is not cls:
            raise ValueError(f"objective {name!r} is registered twice ({OBJECTIVES[name].__qualname__}, {cls.__qualname__})")
        cls.name = name
        cls.title = cls.__dict__.get("title") or name
        OBJECTIVES[name] = cls
        return cls

    return register


def objective_names() -> list[str]:
    return sorted(OBJECTIVES)


def get_objective(name: str) -> type[Objective]:
    """The registered class; an unknown name is an error that lists the registered ones."""
    if name not in OBJECTIVES:
        raise ValueError(f"model.objective={name!r} is not a registered objective; allowed: {', '.join(objective_names())}")
    return OBJECTIVES[name]


def build_model(model_config: Any, image_size: int) -> Objective:
    """The objective's model described by the `model` config section, at `data.image_size`."""
    return get_objective(model_config.objective).from_config(model_config, image_size)


def locked_keys(model_config: Any) -> tuple[str, ...]:
    """Dotted config keys of the chosen objective that a resumed run may not change (they shape the weights)."""
    cls = get_objective(model_config.objective)
    return tuple(f"model.{cls.name}.{key}" for key in cls.locked)


from common.objectives import masked, vae  # noqa: E402,F401  - the built-in objectives register themselves
from common.plugins import import_plugins  # noqa: E402

import_plugins()  # objectives of modules named in DERMFED_PLUGINS (the process environment, never the run config)

__all__ = ["ENCODER_PREFIX", "OBJECTIVES", "SHARE_SCOPES", "Objective", "ObjectiveSettings", "available_encoders",
           "build_model", "create_encoder", "get_objective", "locked_keys", "objective_names", "register_objective",
           "strip_wrapper_prefixes"]
