"""FFCV's on-disk layout of a `.beton` (format version 2), read and checked with NumPy alone.

A file is: header, field descriptors, one metadata row per sample, the data region, and the allocation table
(sample_id, ptr, size) at the end. `_read_tables` reads all but the data, refusing what is no FFCV file at all
(`NotABetonError`) and a truncated or damaged one (`InputError`), without importing FFCV or torch (seconds and
600 MB of imports for `info` and `prune`). `dptool.beton.open_beton` builds its `Beton` from them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import InputError

__all__ = ["NotABetonError"]


class NotABetonError(InputError):
    """The file is not an FFCV file at all (as opposed to a damaged one)."""


# FFCV's on-disk header (ffcv/types.py, format version 1); read with NumPy so that a bad file gives one sentence.
_HEADER = np.dtype(
    [
        ("version", "<u2"),
        ("num_fields", "<u2"),
        ("page_size", "<u4"),
        ("num_samples", "<u8"),
        ("alloc_table_ptr", "<u8"),
    ],
    align=True,
)
_FIELD_DESC = np.dtype([("type_id", "<u1"), ("name", ("<u1", (16,))), ("arguments", ("<u1", (1024,)))], align=True)
_ALLOC = np.dtype([("sample_id", "<u8"), ("ptr", "<u8"), ("size", "<u8")])
_TYPE_NAMES = {
    0: "FloatField",
    1: "IntField",
    2: "RGBImageField",
    3: "BytesField",
    4: "NDArrayField",
    5: "JSONField",
    6: "TorchTensorField",
}
_FORMAT_VERSION = 2  # ffcv.types.CURRENT_VERSION of FFCV 1.0
# Each field type's metadata row (the `metadata_type` of FFCV 1.0's field classes, which takes no arguments),
# so that opening a file needs neither FFCV nor torch (seconds and 600 MB of imports for `info` and `prune`).
_PTR_SIZE = np.dtype([("ptr", "<u8"), ("size", "<u8")])
_METADATA_TYPES = {
    0: np.dtype("<f8"),  # FloatField
    1: np.dtype("<i8"),  # IntField
    2: np.dtype([("mode", "<u1"), ("width", "<u2"), ("height", "<u2"), ("data_ptr", "<u8")]),  # RGBImageField
    3: _PTR_SIZE,  # BytesField
    4: np.dtype("<u8"),  # NDArrayField
    5: _PTR_SIZE,  # JSONField
    6: np.dtype("<u8"),  # TorchTensorField
}


def _read_tables(path: Path) -> dict:
    """Read and check FFCV's header, field descriptors, metadata and allocation table of the file at `path`:
    the `Beton` fields other than `path` and `sidecar`. NotABetonError for what is no FFCV file at all,
    InputError for a truncated or damaged one."""
    size = path.stat().st_size
    if size < _HEADER.itemsize:
        raise NotABetonError(f"{path} is not a .beton file (too small for an FFCV header).")
    header = np.fromfile(path, dtype=_HEADER, count=1)[0]
    n_fields, n = int(header["num_fields"]), int(header["num_samples"])
    page_size, alloc_ptr = int(header["page_size"]), int(header["alloc_table_ptr"])
    if (
        int(header["version"]) != _FORMAT_VERSION
        or not 0 < n_fields < 64
        or page_size <= 0
        or page_size & (page_size - 1)
    ):
        raise NotABetonError(f"{path} is not a .beton file (bad FFCV header).")
    desc_end = _HEADER.itemsize + n_fields * _FIELD_DESC.itemsize
    if desc_end > size:
        raise InputError(f"{path} is truncated (field descriptors cut off).")
    descs = np.fromfile(path, dtype=_FIELD_DESC, count=n_fields, offset=_HEADER.itemsize)
    names, types = [], []
    for d in descs:
        type_id = int(d["type_id"])
        if type_id not in _TYPE_NAMES:
            raise NotABetonError(f"{path} is not a .beton file (unknown field type {type_id}).")
        names.append(bytes(d["name"]).rstrip(b"\0").decode("ascii", "replace"))
        types.append(_TYPE_NAMES[type_id])
    meta_type = _metadata_type(descs)
    data_start = desc_end + n * meta_type.itemsize
    if alloc_ptr < data_start or alloc_ptr > size or (size - alloc_ptr) % _ALLOC.itemsize:
        raise InputError(f"{path} is truncated or damaged (allocation table at {alloc_ptr}, file size {size}).")
    metadata = np.fromfile(path, dtype=meta_type, count=n, offset=desc_end)
    alloc = np.fromfile(path, dtype=_ALLOC, count=(size - alloc_ptr) // _ALLOC.itemsize, offset=alloc_ptr)
    if len(alloc) and int((alloc["ptr"] + alloc["size"]).max()) > alloc_ptr:
        raise InputError(f"{path} is truncated or damaged (sample data past the allocation table).")
    # a file cut at a multiple of the table's row size keeps a well-formed but shorter allocation table: every
    # sample needs one row per variable-size field (those with a data pointer, e.g. the image)
    allocated_fields = sum("data_ptr" in (meta_type[f].names or ()) for f in meta_type.names or ())
    if allocated_fields and n:
        if len(alloc) and int(alloc["sample_id"].max()) >= n:
            raise InputError(f"{path} is damaged (allocation table names sample {int(alloc['sample_id'].max())} "
                             f"of {n}).")
        missing = np.flatnonzero(np.bincount(alloc["sample_id"].astype(np.int64), minlength=n) < allocated_fields)
        if len(missing):
            raise InputError(f"{path} is truncated or damaged ({len(missing)} samples have no allocation, the "
                             f"first is sample {int(missing[0])}).")
    return dict(num_samples=n, page_size=page_size, field_names=tuple(names), field_types=tuple(types),
                file_size=size, header=header, field_descriptors=descs, metadata=metadata, alloc_table=alloc,
                data_start=data_start)


def _metadata_type(descs: np.ndarray) -> np.dtype:
    """The dtype of one metadata row (columns f0, f1, ... in field order), as `ffcv.types.get_metadata_type`
    builds it from the field descriptors."""
    return np.dtype([("", _METADATA_TYPES[int(d["type_id"])]) for d in descs], align=True)
