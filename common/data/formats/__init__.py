"""Data formats, found by name: the registry behind `data.format` and `evaluation.external[].format`.

A format is one module in this package (or anywhere: a test module, a plugin) that registers a
loader with `@register_format(...)`. The loader's contract (`RegisteredFormat.load`): given a
`DataConfig` whose `root` holds the data, find every image and its site, lesion (or patient)
group and canonical label, and return a `Catalog`; it only reads (nothing is decoded, nothing is
written; image checks happen in `common.data.cache.scan`). `holds` says what `data.root` must
hold (used in every "not found" message), `labelled` whether the format carries labels (an
external test set needs them; evaluation refuses a source without them).

Adding a format: a module like `isic2020.py` plus its import below. A format registered from
elsewhere (a test module) works with every command run in the same process (data summary,
pretrain, evaluate) with no other change; a simulation's sites run in processes of their own,
which know the formats imported here and those of the modules named in the `DERMFED_PLUGINS`
environment variable (`common.plugins`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from common.data.catalog import Catalog, DataError

if TYPE_CHECKING:
    from common.config import DataConfig


Loader = Callable[["DataConfig"], Catalog]


@dataclass(frozen=True)
class RegisteredFormat:
    """One registered layout of a data folder."""

    name: str
    load: Loader  # DataConfig -> Catalog: every image below cfg.root with site, group, label; reads only
    holds: str  # what data.root must hold, for messages ("the HAM10000 download: ...")
    labelled: bool = True  # rows carry a label (an external test set must)


FORMATS: dict[str, RegisteredFormat] = {}


def register_format(name: str, *, holds: str, labelled: bool = True) -> Callable[[Loader], Loader]:
    """Decorator: register `loader` as data format `name` (a second registration of one name is an error)."""

    def register(loader: Loader) -> Loader:
        if name in FORMATS and FORMATS[name].load is not loader:
            raise ValueError(f"data format {name!r} is registered twice ({FORMATS[name].load.__module__} and "
                             f"{loader.__module__})")
        FORMATS[name] = RegisteredFormat(name, loader, holds, labelled)
        return loader

    return register


def _allowed() -> str:
    """The registered names as pydantic words a Literal's choices: today's message, unchanged."""
    names = [f"'{n}'" for n in FORMATS]
    return ", ".join(names[:-1]) + f" or {names[-1]}" if len(names) > 1 else "".join(names)


def check_format_name(name: str) -> str:
    """`name` if it is a registered format; a ValueError listing the registered ones otherwise (config validation)."""
    if name not in FORMATS:
        raise ValueError(f"Input should be {_allowed()}")
    return name


def get_format(name: str) -> RegisteredFormat:
    try:
        return FORMATS[name]
    except KeyError:
        raise DataError(f"data format {name!r} is not registered; registered: {_allowed()}") from None


def load_catalog(cfg: DataConfig) -> Catalog:
    """The whole catalog for `data.format` at `data.root` (every site: `data.site` is applied after splitting)."""
    fmt = get_format(cfg.format)
    catalog = fmt.load(cfg)
    if len(catalog) == 0:
        reasons = ", ".join(f"{n} {reason}" for reason, n in catalog.skipped["reason"].value_counts().items())
        found = "no image of the metadata was found under" if fmt.labelled else "no image file was found under"
        raise DataError(f"{cfg.format}: {found} {catalog.root} (skipped: {reasons or 'nothing'}); "
                        f"expected {fmt.holds}")
    return catalog


# The built-in formats register themselves on import (one module each).
from common.data.formats import ham10000, isic2019, isic_gt, isic2020, folder, synthetic  # noqa: E402,F401,I001
from common.plugins import import_plugins  # noqa: E402

import_plugins()  # formats of modules named in DERMFED_PLUGINS (the process environment, never the run config)
