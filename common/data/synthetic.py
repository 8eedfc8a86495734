"""Procedural dermoscopy-like images: the embedded default data set.

The demo and the tests need data that ships with the project, with the structure the study
cares about:

- the *class* of a lesion shows only in clinical features, the ones of the ABCD rule and
  pattern analysis: asymmetry, border irregularity, colour variegation, diameter, dots and
  globules, regression areas (blue-white, scar-like), milia-like cysts;
- the *hospital* changes only acquisition: illumination gradient, colour cast, vignetting,
  hair, ruler marks, gel bubbles, ink marks, resolution and JPEG quality;
- with `synth.shortcut`, one non-clinical artefact tracks one class in the training and
  validation splits but is independent of class in the test split, so a classifier that learnt
  the artefact instead of the lesion is caught by its test accuracy on mismatched images.

Output is HAM10000's layout (`synthetic_metadata.csv` with lesion_id, image_id, dx, dataset,
... and `images/*.jpg`), read by the same loader as HAM10000. Deterministic from the seed.
Lesion and image ids carry the seed (`SYN3_0100002_1`: seed 3, site 1, lesion 2, image 1):
data sets drawn with other seeds are other images, and the evaluation's leak guard, which
compares ids, must see them as such (one can be an external test set of the other).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from common.config import DermFedConfig, SynthConfig, write_config
from common.data.labels import HAM10000_DX
from common.data.formats.synthetic import SYNTHETIC_CSV

ARTIFACTS = ("ruler", "hair", "bubbles", "vignette", "ink")
LOCALIZATIONS = ("back", "trunk", "lower extremity", "upper extremity", "abdomen", "face", "chest")


@dataclass(frozen=True)
class AcquisitionProfile:
    """What a hospital's dermatoscope, camera and habits add; nothing clinical."""

    name: str
    illumination: float  # strength of a linear brightness gradient
    colour_cast: tuple[float, float, float]  # per-channel gains
    artifact_rates: dict[str, float]  # probability of each artefact per image
    downsample: int  # resolution loss factor (1 = full resolution)
    jpeg_quality: int


# The first four sites are deliberately different, as HAM10000's four archives are.
_BASE_PROFILES = (
    dict(illumination=0.05, colour_cast=(1.00, 0.98, 0.95), rates=dict(ruler=0.1, hair=0.3, bubbles=0.05, vignette=0.1, ink=0.05), downsample=1, quality=92),
    dict(illumination=0.25, colour_cast=(1.08, 0.97, 0.88), rates=dict(ruler=0.3, hair=0.5, bubbles=0.3, vignette=0.7, ink=0.1), downsample=2, quality=80),
    dict(illumination=0.12, colour_cast=(0.92, 0.98, 1.10), rates=dict(ruler=0.5, hair=0.2, bubbles=0.5, vignette=0.3, ink=0.2), downsample=1, quality=70),
    dict(illumination=0.30, colour_cast=(1.02, 1.05, 0.97), rates=dict(ruler=0.2, hair=0.7, bubbles=0.1, vignette=0.9, ink=0.02), downsample=3, quality=60),
)


def site_profiles(num_sites: int, seed: int) -> list[AcquisitionProfile]:
    rng = np.random.default_rng([seed, 7919])
    profiles = []
    for i in range(num_sites):
        if i < len(_BASE_PROFILES):
            base = _BASE_PROFILES[i]
        else:
            base = dict(
                illumination=float(rng.uniform(0.0, 0.3)),
                colour_cast=tuple(float(g) for g in rng.uniform(0.88, 1.12, 3)),
                rates={name: float(rng.uniform(0.0, 0.8)) for name in ARTIFACTS},
                downsample=int(rng.integers(1, 4)),
                quality=int(rng.integers(55, 95)),
            )
        profiles.append(
            AcquisitionProfile(
                name=f"hospital_{i + 1}",
                illumination=float(base["illumination"]),
                colour_cast=tuple(base["colour_cast"]),  # type: ignore[arg-type]
                artifact_rates=dict(base["rates"]),  # type: ignore[arg-type]
                downsample=int(base["downsample"]),  # type: ignore[arg-type]
                jpeg_quality=int(base["quality"]),  # type: ignore[arg-type]
            )
        )
    return profiles


@dataclass(frozen=True)
class Lesion:
    """Clinical appearance of one lesion; every image of it shares these."""

    dx: str
    radius: float  # fraction of the half-frame: diameter
    asymmetry: float
    border_irregularity: float
    border_softness: float
    colours: tuple[tuple[float, float, float], ...]  # colour variegation
    dots: int
    dots_peripheral: bool
    regression: bool
    milia: int
    skin: tuple[float, float, float]
    seed: int


PALETTE = {
    "light_brown": (0.72, 0.50, 0.33),
    "dark_brown": (0.40, 0.24, 0.14),
    "black": (0.12, 0.09, 0.08),
    "blue_gray": (0.42, 0.48, 0.58),
    "red": (0.70, 0.30, 0.28),
    "tan": (0.80, 0.62, 0.45),
}


def sample_lesion(dx: str, rng: np.random.Generator) -> Lesion:
    """Draw clinical features from class-dependent, overlapping distributions."""
    skin = tuple(float(v) for v in np.array([0.93, 0.76, 0.66]) * rng.uniform(0.85, 1.03) + rng.normal(0, 0.015, 3))
    if dx == "nv":
        colours = [PALETTE["light_brown"], PALETTE["dark_brown"]][: int(rng.integers(1, 3))]
        return Lesion(dx, rng.uniform(0.25, 0.45), rng.uniform(0.0, 0.15), rng.uniform(0.0, 0.05), rng.uniform(0.03, 0.06),
                      tuple(colours), int(rng.integers(0, 6)), False, bool(rng.random() < 0.05), 0, skin, int(rng.integers(2**31)))
    if dx == "mel":
        names = ["dark_brown", "black", "blue_gray", "red", "light_brown"]
        chosen = rng.choice(names, size=int(rng.integers(3, 6)), replace=False)
        return Lesion(dx, rng.uniform(0.38, 0.7), rng.uniform(0.15, 0.45), rng.uniform(0.12, 0.3), rng.uniform(0.01, 0.03),
                      tuple(PALETTE[n] for n in chosen), int(rng.integers(6, 20)), True, bool(rng.random() < 0.65), 0, skin, int(rng.integers(2**31)))
    if dx == "bkl":
        colours = [PALETTE["tan"], PALETTE["light_brown"]]
        return Lesion(dx, rng.uniform(0.3, 0.55), rng.uniform(0.05, 0.25), rng.uniform(0.03, 0.08), rng.uniform(0.005, 0.015),
                      tuple(colours), int(rng.integers(3, 10)), False, False, int(rng.integers(4, 12)), skin, int(rng.integers(2**31)))
    raise ValueError(f"no synthetic model for dx={dx!r}")


def _blob(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, sigma: float) -> np.ndarray:
    return np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2))


def _stamp_discs(img: np.ndarray, yy: np.ndarray, xx: np.ndarray, centres: np.ndarray, radii: np.ndarray,
                 colour: tuple[float, float, float], opacity: float = 0.9) -> None:
    for (cy, cx), r in zip(centres, radii):
        mask = np.clip((r - np.hypot(yy - cy, xx - cx)) / max(r * 0.35, 1e-3), 0, 1)[..., None] * opacity
        img[:] = img * (1 - mask) + np.asarray(colour) * mask


def render_lesion(lesion: Lesion, size: int, rng: np.random.Generator) -> np.ndarray:
    """The clinical part of an image, float RGB in [0, 1]; pose varies per image."""
    shape_rng = np.random.default_rng(lesion.seed)  # the lesion's own shape, same in every image
    yy, xx = np.mgrid[-1:1:size * 1j, -1:1:size * 1j]
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.cos(angle) * yy - np.sin(angle) * xx, np.sin(angle) * yy + np.cos(angle) * xx
    theta, dist = np.arctan2(yy, xx), np.hypot(yy, xx)

    skin_noise = sum(0.02 * np.sin(f * xx + p) * np.cos(f * yy + q) for f, p, q in rng.uniform(1, 6, (3, 3)))
    img = np.broadcast_to(np.asarray(lesion.skin), (size, size, 3)) * (1 + skin_noise)[..., None]

    phase = shape_rng.uniform(0, 2 * np.pi, 12)
    amplitude = shape_rng.uniform(0.3, 1.0, 12)
    radius = lesion.radius * rng.uniform(0.95, 1.05) * (1 + lesion.asymmetry * np.cos(theta - phase[0]))
    for k in range(3, 12):
        radius = radius + lesion.radius * lesion.border_irregularity * amplitude[k] / 3 * np.cos(k * theta + phase[k])
    alpha = 1 / (1 + np.exp(-(radius - dist) / lesion.border_softness))

    # Pigment: darker centre, then blobs of further colours (variegation).
    pigment = np.broadcast_to(np.asarray(lesion.colours[0]), (size, size, 3)).copy()
    pigment *= (0.85 + 0.15 * np.clip(dist / max(lesion.radius, 1e-3), 0, 1))[..., None]
    for colour in lesion.colours[1:]:
        cy, cx = shape_rng.uniform(-0.6, 0.6, 2) * lesion.radius
        weight = _blob(yy, xx, cy, cx, lesion.radius * shape_rng.uniform(0.2, 0.5))[..., None] * 0.9
        pigment = pigment * (1 - weight) + np.asarray(colour) * weight
    if lesion.regression:
        cy, cx = shape_rng.uniform(-0.5, 0.5, 2) * lesion.radius
        veil = _blob(yy, xx, cy, cx, lesion.radius * 0.3)[..., None] * 0.85
        pepper = (rng.random((size, size)) < 0.04)[..., None] * veil
        pigment = pigment * (1 - veil) + np.array([0.78, 0.80, 0.86]) * veil
        pigment = pigment * (1 - pepper) + np.array([0.35, 0.38, 0.48]) * pepper
    img = img * (1 - alpha[..., None]) + pigment * alpha[..., None]

    if lesion.dots:
        where = shape_rng.uniform(0.7, 1.0, lesion.dots) if lesion.dots_peripheral else shape_rng.uniform(0, 0.6, lesion.dots)
        phi = shape_rng.uniform(0, 2 * np.pi, lesion.dots)
        centres = np.stack([np.sin(phi), np.cos(phi)], 1) * (where * lesion.radius)[:, None]
        spread = (0.01, 0.045) if lesion.dots_peripheral else (0.012, 0.02)  # irregular vs regular globules
        _stamp_discs(img, yy, xx, centres, shape_rng.uniform(*spread, lesion.dots), PALETTE["black"], 0.85)
    if lesion.milia:
        centres = shape_rng.uniform(-0.6, 0.6, (lesion.milia, 2)) * lesion.radius
        _stamp_discs(img, yy, xx, centres, shape_rng.uniform(0.012, 0.025, lesion.milia), (0.95, 0.93, 0.82), 0.8)
    return img


def _paint(img: np.ndarray, draw: Callable[[ImageDraw.ImageDraw, int], None], colour: tuple[float, float, float],
           opacity: float) -> None:
    """Draw shapes on a mask with PIL, then blend `colour` into `img` through it."""
    size = img.shape[0]
    mask = Image.new("L", (size, size), 0)
    draw(ImageDraw.Draw(mask), size)
    weight = np.asarray(mask, dtype=np.float64)[..., None] / 255.0 * opacity
    img[:] = img * (1 - weight) + np.asarray(colour) * weight


def _draw_hair(img: np.ndarray, rng: np.random.Generator) -> None:
    def draw(canvas: ImageDraw.ImageDraw, size: int) -> None:
        for _ in range(int(rng.integers(2, 7))):
            start, bend, end = rng.uniform(-0.1, 1.1, (3, 2)) * size
            t = np.linspace(0, 1, 24)[:, None]
            points = (1 - t) ** 2 * start + 2 * (1 - t) * t * bend + t**2 * end
            canvas.line([tuple(p) for p in points], fill=255, width=max(1, size // 80))

    _paint(img, draw, (0.15, 0.11, 0.09), 0.85)


def _draw_ruler(img: np.ndarray, rng: np.random.Generator) -> None:
    def draw(canvas: ImageDraw.ImageDraw, size: int) -> None:
        edge = int(rng.uniform(0.86, 0.93) * size)
        canvas.rectangle([0, edge, size, edge + max(1, size // 50)], fill=255)
        step = max(3, size // 20)
        for x in range(int(rng.integers(0, step)), size, step):
            canvas.line([(x, edge - max(2, size // 25)), (x, edge)], fill=255, width=max(1, size // 128))

    _paint(img, draw, (0.10, 0.10, 0.10), 1.0)


def _draw_bubbles(img: np.ndarray, rng: np.random.Generator) -> None:
    def draw(canvas: ImageDraw.ImageDraw, size: int) -> None:
        for _ in range(int(rng.integers(1, 5))):
            cy, cx = rng.uniform(0.05, 0.95, 2) * size
            r = rng.uniform(0.025, 0.075) * size
            canvas.ellipse([cx - r, cy - r, cx + r, cy + r], outline=255, width=max(1, size // 100))

    _paint(img, draw, (1.0, 1.0, 1.0), 0.8)


def _draw_ink(img: np.ndarray, rng: np.random.Generator) -> None:
    def draw(canvas: ImageDraw.ImageDraw, size: int) -> None:
        phi = rng.uniform(0, 2 * np.pi)
        cy, cx = (0.5 + 0.42 * np.array([np.sin(phi), np.cos(phi)])) * size
        for dy, dx in rng.normal(0, 0.015 * size, (6, 2)):
            r = 0.015 * size
            canvas.ellipse([cx + dx - r, cy + dy - r, cx + dx + r, cy + dy + r], fill=255)

    _paint(img, draw, (0.35, 0.15, 0.55), 0.8)


def _vignette(img: np.ndarray, rng: np.random.Generator) -> None:
    size = img.shape[0]
    yy, xx = np.mgrid[-1:1:size * 1j, -1:1:size * 1j]
    fall = np.clip((np.hypot(yy, xx) - 0.75) / 0.5, 0, 1)[..., None]
    img[:] = img * (1 - rng.uniform(0.5, 0.9) * fall)


ARTIFACT_PAINTERS = {"ruler": _draw_ruler, "hair": _draw_hair, "bubbles": _draw_bubbles, "vignette": _vignette, "ink": _draw_ink}


def acquire(clinical: np.ndarray, profile: AcquisitionProfile, artifacts: list[str], rng: np.random.Generator) -> Image.Image:
    """What the hospital's camera makes of a lesion: artefacts, light, colour, resolution."""
    size = clinical.shape[0]
    yy, xx = np.mgrid[-1:1:size * 1j, -1:1:size * 1j]
    img = clinical.copy()
    for name in artifacts:
        ARTIFACT_PAINTERS[name](img, rng)
    direction = rng.uniform(0, 2 * np.pi)
    img *= (1 + profile.illumination * (np.cos(direction) * xx + np.sin(direction) * yy))[..., None]
    img *= np.asarray(profile.colour_cast)
    img += rng.normal(0, 0.01, img.shape)
    image = Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8))
    if profile.downsample > 1:
        small = max(8, size // profile.downsample)
        image = image.resize((small, small), Image.Resampling.BILINEAR).resize((size, size), Image.Resampling.BILINEAR)
    return image


def _choose_artifacts(profile: AcquisitionProfile, cfg: SynthConfig, dx: str, split: str,
                      rng: np.random.Generator) -> list[str]:
    chosen = [name for name in ARTIFACTS if rng.random() < profile.artifact_rates.get(name, 0.0)]
    if not cfg.shortcut:
        return chosen
    if split == "test":  # independent of class: the shortcut no longer pays
        present = rng.random() < 0.5
    else:
        p = cfg.shortcut_strength if dx == cfg.shortcut_class else 1 - cfg.shortcut_strength
        present = rng.random() < p
    chosen = [name for name in chosen if name != cfg.shortcut_artifact]
    return chosen + [cfg.shortcut_artifact] if present else chosen


def _lesion_splits(n: int, cfg: SynthConfig, rng: np.random.Generator) -> list[str]:
    n_test = max(1, int(round(n * cfg.test_fraction)))
    n_val = int(round(n * cfg.val_fraction)) if cfg.val_fraction > 0 else 0
    labels = ["test"] * n_test + ["val"] * n_val + ["train"] * max(0, n - n_test - n_val)
    return list(rng.permutation(labels))


def generate(config: DermFedConfig, out: str | Path, progress: bool = True) -> pd.DataFrame:
    """Write the synthetic data set to `out`; return its metadata (also `out/synthetic_metadata.csv`)."""
    cfg = config.synth
    out = Path(out)
    images_dir = out / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    profiles = site_profiles(cfg.num_sites, config.seed)
    rows = []
    total = cfg.num_sites * cfg.lesions_per_site
    bar = tqdm(total=total, desc="synthesising lesions", unit="lesion", disable=None if progress else True, leave=False)
    for site_index, profile in enumerate(profiles):
        rng = np.random.default_rng([config.seed, site_index])
        class_mix = rng.dirichlet(np.full(len(cfg.classes), 4.0))
        dxs = [cfg.classes[i] for i in rng.choice(len(cfg.classes), size=cfg.lesions_per_site, p=class_mix)]
        for lesion_index, (dx, split) in enumerate(zip(dxs, _lesion_splits(cfg.lesions_per_site, cfg, rng))):
            lesion = sample_lesion(dx, rng)
            lesion_id = f"SYN{config.seed}_{site_index + 1:02d}{lesion_index:05d}"
            age, sex, place = int(rng.integers(18, 90)), str(rng.choice(["male", "female"])), str(rng.choice(LOCALIZATIONS))
            for image_index in range(int(rng.integers(1, cfg.max_images_per_lesion + 1))):
                artifacts = _choose_artifacts(profile, cfg, dx, split, rng)
                image = acquire(render_lesion(lesion, cfg.image_size, rng), profile, artifacts, rng)
                image_id = f"{lesion_id}_{image_index}"
                image.save(images_dir / f"{image_id}.jpg", quality=profile.jpeg_quality)
                rows.append(dict(
                    lesion_id=lesion_id, image_id=image_id, dx=dx, dx_type="synthetic", age=age, sex=sex,
                    localization=place, dataset=profile.name, split=split,
                    shortcut_artifact=int(cfg.shortcut_artifact in artifacts), artifacts=";".join(artifacts),
                ))
            bar.update(1)
    bar.close()
    metadata = pd.DataFrame(rows)
    metadata.to_csv(out / SYNTHETIC_CSV, index=False)
    write_config(config, out, "dermfed_synth_config.yaml")
    return metadata


def shortcut_matches_class(frame: pd.DataFrame, shortcut_class: str) -> pd.Series:
    """True where the artefact agrees with the class as in training (artefact <=> shortcut class).

    `frame` is a catalog frame (canonical labels); `shortcut_class` is the HAM dx code of
    `synth.shortcut_class`.
    """
    target = HAM10000_DX[shortcut_class]
    return (frame["shortcut_artifact"].astype(int) == 1) == (frame["label"] == target)
