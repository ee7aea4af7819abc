"""Generated image data for tests, examples and benchmarks: seeded, deterministic, no download."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

__all__ = ["separable_images", "write_npz", "write_image_folder"]


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
