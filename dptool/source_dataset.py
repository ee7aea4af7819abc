"""What every dataset reader is, and how any image becomes one of its samples.

A reader is an indexable `SourceDataset`: `len()`, `[i] -> (HxWx3 uint8 array, label)`, `class_names`, `labels`
(read without decoding images where the format allows) and `describe(i)` for messages. `load(i)` raises
`UnreadableImage` with a one-line reason for a file that must be skipped (zero bytes, not an image, too many
pixels, corrupt or truncated), after opening the file only once: `decode_image_file` does that for an image file,
`to_rgb_array` turns any PIL image into RGB. The readers of each format are in `dptool.readers` and `dptool.coop`.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageFile

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "UnreadableImage",
    "SourceDataset",
    "to_rgb_array",
    "decode_image_file",
    "decode_image_bytes",
]


#: PIL's own decompression-bomb threshold; larger images are skipped as bombs.
DEFAULT_MAX_PIXELS = 89_478_485

# Truncated files must raise, not be silently padded.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class UnreadableImage(Exception):
    """A sample that cannot become an RGB image; the message is the reason, in a few words."""


def to_rgb_array(img: Image.Image) -> np.ndarray:
    """Convert any PIL image (L, P, RGBA, LA, CMYK, I;16, I, F...) to an (H, W, 3) uint8 RGB array.

    Transparent images are composited on white; 16-bit and 32-bit images are scaled to 8 bits.
    """
    mode = img.mode
    if mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"), dtype=np.uint8)
    if mode.startswith("I;16") or mode in ("I", "F"):
        arr = np.asarray(img).astype(np.float64)
        top = 65535.0 if mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        gray = np.clip(np.rint(arr * (255.0 / top)), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img, dtype=np.uint8)


def _array_to_rgb(arr: np.ndarray) -> np.ndarray:
    """(H, W), (H, W, 1), (H, W, 3) or (H, W, 4) uint8 -> (H, W, 3) uint8."""
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.shape[2] == 1:
        return np.ascontiguousarray(np.repeat(arr, 3, axis=2))
    if arr.shape[2] == 4:
        return to_rgb_array(Image.fromarray(arr, "RGBA"))
    return np.ascontiguousarray(arr)


@dataclass
class SourceDataset:
    """An indexable dataset of (RGB uint8 image, int label) with class names; subclasses load samples."""

    class_names: list[str]
    labels: np.ndarray  # (N,) int64
    format: str
    root: str
    split: str | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    skipped: list[dict] = field(default_factory=list)
    provenance: dict = field(default_factory=dict)  # what the sidecar's source records besides path/format/split

    def __len__(self) -> int:
        return len(self.labels)

    def describe(self, index: int) -> str:
        """A human name for sample `index` (a file path where there is one)."""
        return f"{self.format} sample {index}"

    def load(self, index: int) -> np.ndarray:
        """Decode sample `index` to an (H, W, 3) uint8 array; raises UnreadableImage (or a decoder error)."""
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        return self.load(index), int(self.labels[index])


def decode_image_file(path: str, max_pixels: int) -> np.ndarray:
    """Decode the existing file `path` to (H, W, 3) uint8, opening it once; UnreadableImage says why not (zero
    bytes, more than `max_pixels` pixels, not an image, corrupt or truncated)."""
    if os.path.getsize(path) == 0:
        raise UnreadableImage("zero-byte file")
    return _decode(path, max_pixels)


def decode_image_bytes(data: bytes, max_pixels: int, *, expected: int | None = None) -> np.ndarray:
    """Decode an image file's bytes (a tar member's) as `decode_image_file` decodes the file, with the same reasons
    to skip it; fewer bytes than `expected` (the file read has been cut since it was indexed) is one more."""
    if expected is not None and len(data) < expected:
        raise UnreadableImage(f"only {len(data)} of its {expected} bytes could be read (the file ends there: changed "
                              "since it was indexed?)")
    if not data:
        raise UnreadableImage("zero-byte file")
    return _decode(io.BytesIO(data), max_pixels)


def _decode(file, max_pixels: int) -> np.ndarray:
    """Decode a path or a file object (PIL's messages name the object by its address: left out of the reason)."""
    try:
        with Image.open(file) as img:
            width, height = img.size
            if width * height > max_pixels:
                raise UnreadableImage(f"decompression bomb ({width}x{height} > {max_pixels} pixels)")
            img.load()
            return to_rgb_array(img)
    except Image.DecompressionBombError as exc:
        raise UnreadableImage("decompression bomb (too many pixels)") from exc
    except (OSError, ValueError, SyntaxError) as exc:
        text = str(exc) if isinstance(file, str) else str(exc).replace(f" {file!r}", "")
        raise UnreadableImage(f"not a readable image ({type(exc).__name__}: {text})") from exc
