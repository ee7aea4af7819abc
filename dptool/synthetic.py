"""Generated image data for tests, examples and benchmarks: seeded, deterministic, no download."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

__all__ = [
    "separable_images",
    "write_npz",
    "write_image_folder",
    "mini_imagenet",
    "relevant_source_classes",
    "FAMILIES",
]


def separable_images(
    n_classes: int, per_class: int, size: int = 32, *, seed: int = 0, noise: float = 12.0
) -> tuple[np.ndarray, np.ndarray]:
    """Easily separable classes: each has its own base colour and stripe frequency, plus pixel noise.

    Returns images (N, size, size, 3) uint8 and labels (N,) int64, N = n_classes * per_class, class-sorted.
    """
    rng = np.random.default_rng(seed)
    palette = rng.integers(30, 226, size=(n_classes, 3)).astype(np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    images = np.empty((n_classes * per_class, size, size, 3), dtype=np.uint8)
    for c in range(n_classes):
        freq = 1 + c % 7
        angle = np.pi * (c % 5) / 5
        stripes = np.sin(2 * np.pi * freq * (xx * np.cos(angle) + yy * np.sin(angle)))[..., None] * 40
        base = palette[c] + stripes
        for j in range(per_class):
            img = base + rng.normal(0, noise, size=(size, size, 3))
            images[c * per_class + j] = np.clip(img, 0, 255).astype(np.uint8)
    labels = np.repeat(np.arange(n_classes, dtype=np.int64), per_class)
    return images, labels


def write_npz(
    path: str | os.PathLike, images: np.ndarray, labels: np.ndarray, class_names: list[str] | None = None
) -> Path:
    """Save images/labels (and class names) in the `.npz` layout `dptool convert` reads."""
    arrays = {"images": images, "labels": labels}
    if class_names is not None:
        arrays["class_names"] = np.asarray(class_names)
    np.savez(path, **arrays)
    return Path(path)


def write_image_folder(
    root: str | os.PathLike, images: np.ndarray, labels: np.ndarray, class_names: list[str], *, ext: str = "png"
) -> Path:
    """Write an ImageFolder tree root/<class name>/<index>.<ext> (PNG is lossless; JPEG for realism)."""
    from PIL import Image

    root = Path(root)
    for name in class_names:
        (root / name).mkdir(parents=True, exist_ok=True)
    for i, (img, label) in enumerate(zip(images, labels)):
        Image.fromarray(img).save(root / class_names[int(label)] / f"{i:06d}.{ext}")
    return root


# ---------------------------------------------------------------------------------------------------------
# A structured "mini-ImageNet" for the demo and the transfer experiment. Its design is fixed up front, before
# any result was looked at: 5 families x 20 classes of procedural 32 px images; the target task takes two of
# the families (shapes and stripes) under a colour/background shift, so that only 40 of the 100 source classes
# carry features the target needs. Nothing here is tuned to favour one scoring method.
# ---------------------------------------------------------------------------------------------------------

FAMILIES = ("shapes", "stripes", "checkers", "dots", "gradients")
_SOURCE_COLOURS = np.array(
    [[220, 40, 40], [40, 180, 60], [50, 80, 220], [230, 200, 40], [200, 60, 200]], dtype=np.float32
)
_TARGET_COLOURS = np.array([[250, 140, 20], [20, 200, 200], [140, 90, 40], [240, 240, 240]], dtype=np.float32)
_SHAPES = ("circle", "square", "triangle", "diamond", "ring")


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return (yy + 0.5) / size * 2 - 1, (xx + 0.5) / size * 2 - 1  # [-1, 1]


def _shape_mask(kind: str, y: np.ndarray, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    cy, cx = rng.uniform(-0.3, 0.3, 2)
    r = rng.uniform(0.35, 0.6)
    dy, dx = (y - cy) / r, (x - cx) / r
    if kind == "circle":
        return dy**2 + dx**2 <= 1
    if kind == "square":
        return (np.abs(dy) <= 0.8) & (np.abs(dx) <= 0.8)
    if kind == "triangle":
        return (dy <= 0.8) & (dy >= 2 * np.abs(dx) - 1)
    if kind == "diamond":
        return np.abs(dy) + np.abs(dx) <= 1
    return (dy**2 + dx**2 <= 1) & (dy**2 + dx**2 >= 0.4)  # ring


def _render(
    family: int, variant: int, size: int, rng: np.random.Generator, colours: np.ndarray, background: np.ndarray
) -> np.ndarray:
    """One image of class (family, variant in 0..19), as float32 (size, size, 3) in [0, 255]."""
    y, x = _grid(size)
    img = np.broadcast_to(background, (size, size, 3)).copy()
    if family == 0:  # shapes: kind x colour
        kind, colour = _SHAPES[variant % 5], colours[(variant // 5) % len(colours)]
        img[_shape_mask(kind, y, x, rng)] = colour
    elif family == 1:  # stripes: orientation (4) x frequency (5)
        angle = np.pi * (variant // 5) / 4 + rng.normal(0, 0.05)
        freq = 2 + 1.5 * (variant % 5)
        wave = np.sin(np.pi * freq * (x * np.cos(angle) + y * np.sin(angle)) + rng.uniform(0, 2 * np.pi))
        img = img + (wave[..., None] > 0) * (colours[variant % len(colours)] - img)
    elif family == 2:  # checkers: cell size (4) x colour (5)
        cells = 2 + 2 * (variant // 5)
        off = rng.uniform(0, 1, 2)
        board = (np.floor((y + 1) * cells / 2 + off[0]) + np.floor((x + 1) * cells / 2 + off[1])) % 2
        img = img + board[..., None] * (colours[variant % len(colours)] - img)
    elif family == 3:  # dots: radius (4) x count (5)
        radius, count = 0.08 + 0.05 * (variant // 5), 3 + 3 * (variant % 5)
        mask = np.zeros((size, size), bool)
        for cy, cx in rng.uniform(-0.9, 0.9, (count, 2)):
            mask |= (y - cy) ** 2 + (x - cx) ** 2 <= radius**2
        img[mask] = colours[(variant + 2) % len(colours)]
    else:  # gradients: direction (4) x colour (5)
        angle = np.pi * (variant // 5) / 2 + rng.normal(0, 0.1)
        t = np.clip((x * np.cos(angle) + y * np.sin(angle) + 1) / 2, 0, 1)[..., None]
        img = (1 - t) * img + t * colours[variant % len(colours)]
    return img


def mini_imagenet(
    *,
    per_class: int = 60,
    target_train_per_class: int = 40,
    target_test_per_class: int = 40,
    size: int = 32,
    seed: int = 0,
    noise: float = 10.0,
) -> dict[str, tuple]:
    """The built-in source and target data: 100 source classes (5 families x 20), 10 target classes.

    Returns {"source": (images, labels, names), "target_train": (...), "target_test": (...)}; images are
    (N, size, size, 3) uint8. Target classes are the 5 shapes and the 5 stripe frequencies, drawn in colours
    and over backgrounds that the source never uses; so source classes of the shapes and stripes families
    (40 of 100) are the ones that transfer. `relevant_source_classes()` lists them.
    """
    rng = np.random.default_rng(seed)
    src_images, src_labels, src_names = [], [], []
    for family, fname in enumerate(FAMILIES):
        for variant in range(20):
            label = family * 20 + variant
            src_names.append(f"{fname}_{variant:02d}")
            for _ in range(per_class):
                bg = rng.uniform(20, 90, 3).astype(np.float32)
                src_images.append(_render(family, variant, size, rng, _SOURCE_COLOURS, bg))
                src_labels.append(label)

    def target(n_per_class: int, rng: np.random.Generator):
        images, labels = [], []
        for t in range(10):
            family = 0 if t < 5 else 1
            for _ in range(n_per_class):
                # shapes: fixed kind (t), any size/colour row; stripes: fixed frequency (t - 5), any orientation
                variant = (t % 5) + 5 * int(rng.integers(0, 4))
                bg = np.array([90, 90, 90], np.float32) + rng.uniform(-30, 30, 3).astype(np.float32)
                images.append(_render(family, variant, size, rng, _TARGET_COLOURS, bg))
                labels.append(t)
        return images, labels

    tgt_names = [f"shape_{s}" for s in _SHAPES] + [f"stripes_freq{f}" for f in range(5)]
    out = {"source": (src_images, src_labels, src_names)}
    out["target_train"] = (*target(target_train_per_class, np.random.default_rng(seed + 1)), tgt_names)
    out["target_test"] = (*target(target_test_per_class, np.random.default_rng(seed + 2)), tgt_names)
    for key, (images, labels, names) in out.items():
        arr = np.stack(images) + np.random.default_rng(seed + 3).normal(0, noise, (len(images), size, size, 3))
        out[key] = (np.clip(arr, 0, 255).astype(np.uint8), np.asarray(labels, np.int64), names)
    return out


def relevant_source_classes() -> np.ndarray:
    """Source labels of the families the built-in target is drawn from (shapes and stripes): 0..39."""
    return np.arange(40)
