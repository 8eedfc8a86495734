"""Shared fixtures: the real HAM10000 sample (when present), synthetic data, image writers."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# Beside the project (CI, /work/main), or beside the folder of worktrees (/work/wt/NAME); DERMFED_HAM_SAMPLE wins.
_HAM_CANDIDATES = [Path(os.environ["DERMFED_HAM_SAMPLE"])] if os.environ.get("DERMFED_HAM_SAMPLE") else [
    base / "shared" / "data" / "ham10000-sample" for base in (PROJECT_ROOT.parent, PROJECT_ROOT.parent.parent)]
HAM_SAMPLE = next((c for c in _HAM_CANDIDATES if (c / "HAM10000_metadata.csv").is_file()), _HAM_CANDIDATES[0])

if os.environ.get("PYTEST_XDIST_WORKER"):  # two workers on two cores: one compute thread each, for the
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # worker and every process it starts (no oversubscribed spin-waits)
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ["HF_HUB_OFFLINE"] = "1"  # tests never download (the ImageNet arm's online path is tested with a stub)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Slow tests first: longest first is how two workers finish together. A module that runs whole on one worker
    (`xdist_group`) keeps its own order, as its tests may build on the ones before them."""
    def rank(item: pytest.Item) -> int:
        if item.get_closest_marker("xdist_group") is not None:
            return 0
        return 1 if item.get_closest_marker("slow") is not None else 2

    items.sort(key=rank)


@pytest.fixture(autouse=True)
def a_fresh_site_process():
    """Each test meets the ClientApp as a freshly started process: no site runner, and no run's config (a process
    keeps the first config it gets for a run id, and tests reuse run ids)."""
    module = sys.modules.get("client.client_app")
    if module is not None:
        module._RUNNERS.clear()
    yield


@pytest.fixture()
def hospital_images(synthetic_root, tmp_path):
    """One hospital's folder of images, as `dermfed node start --data-root` would name it (the synthetic images)."""
    import shutil

    folder = tmp_path / "clinic_x"
    folder.mkdir()
    for image in sorted((synthetic_root / "images").glob("*.jpg")):
        shutil.copy(image, folder)
    yield folder
    module = sys.modules.get("client.client_app")
    if module is not None:
        module._RUNNERS.clear()


@pytest.fixture(scope="session")
def ham_sample() -> Path:
    if not (HAM_SAMPLE / "HAM10000_metadata.csv").is_file():
        pytest.skip(f"real HAM10000 sample not found at {HAM_SAMPLE} (only present beside the project in CI "
                    "and development machines; never committed: CC BY-NC 4.0)")
    return HAM_SAMPLE


def write_jpeg(path: Path, size: tuple[int, int] = (80, 60), seed: int = 0, quality: int = 90) -> Path:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, quality=quality)
    return path


@pytest.fixture(scope="session")
def smoke_config():
    from common.config import load_config

    return load_config("smoke")


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory, smoke_config) -> Path:
    from common.data.synthetic import generate

    root = tmp_path_factory.mktemp("synthetic")
    generate(smoke_config, root, progress=False)
    return root


@pytest.fixture()
def data_config(tmp_path):
    """A DataConfig factory whose cache lives in the test's own folder."""
    from common.config import load_config

    def make(*overrides: str):
        return load_config("smoke", [f"data.cache_dir={tmp_path / 'cache'}", *overrides])

    return make


def random_image_rows(n: int = 40, size: int = 32, seed: int = 1):
    """`n` random RGB images held in memory, as the engine reads a site's images."""
    from common.data.batches import ImageRows
    from common.data.stores import MemmapStore

    pixels = np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    return ImageRows(MemmapStore(pixels), np.arange(n))
