"""A hospital's plain, unlabelled image folder: first-level sub-folders become sites."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pandas as pd

from common.data.catalog import Catalog, make_catalog
from common.data.formats import register_format
from common.data.formats.reading import require_root, walk_problems
from common.data.images import IMAGE_SUFFIXES, walk_files

if TYPE_CHECKING:
    from common.config import DataConfig


@register_format("folder", holds="a folder of dermoscopy images (sub-folders become sites)", labelled=False)
def load_folder(cfg: DataConfig) -> Catalog:
    """A hospital's plain, unlabelled image folder; first-level sub-folders become sites.

    Symbolic links are followed once (`walk_files`); an image's id is its path below the root,
    suffix included, so `a.jpg` and `a.png` are two images.
    """
    root = require_root(cfg)
    files, problems = walk_files(root)
    rows, skipped = [], walk_problems(problems)
    for path in files:
        relative = path.relative_to(root)
        site = relative.parts[0] if len(relative.parts) > 1 else root.name
        image_id = str(relative)
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            skipped.append({"image_id": image_id, "path": str(path), "site": site, "label": None, "reason": "not an image"})
            continue
        rows.append({"image_id": image_id, "path": path, "site": site, "group": image_id, "label": None})
    frame = pd.DataFrame(rows, columns=["image_id", "path", "site", "group", "label"])
    return make_catalog(frame, [], "folder", root, skipped)
