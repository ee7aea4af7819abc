"""`convert --classes-from REF.beton`: label a source by the class list of another file, by class name.

A val tree that lacks a class numbers every later class one lower than the train tree does (classes are the sorted
folder names); labelled by the train file's class list instead, each class keeps the train file's label, the classes
it lacks keep theirs with no samples, and the output's sidecar names the train file's classes, so `train --val` and
`prune --val` take it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np

from .beton import fingerprint, open_beton
from .errors import InputError
from .source_dataset import SourceDataset

__all__ = ["ReferenceClasses", "reference_classes", "relabel"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReferenceClasses:
    """The class list of a reference `.beton` (index = label) and what names that file."""

    path: str
    fingerprint: str
    class_names: list[str]


def reference_classes(ref: str | os.PathLike) -> ReferenceClasses:
    """The class names of `ref`'s sidecar; a file without them (or naming a class twice) is refused."""
    if not os.path.isfile(ref):
        raise InputError(f"--classes-from {ref} does not exist or is not a file; give the .beton whose classes label "
                         "this conversion (the train file of the same dataset).")
    beton = open_beton(ref)
    names = (beton.sidecar or {}).get("class_names")
    if not names:
        why = "it has no sidecar" if beton.sidecar is None else "its sidecar lists none"
        raise InputError(f"--classes-from {ref} names no classes ({why}); give a .beton written by dptool convert "
                         "from named classes (the train file of the same dataset).")
    if len(set(names)) < len(names):
        twice = next(n for i, n in enumerate(names) if n in names[:i])
        raise InputError(f"--classes-from {ref} names the class {twice!r} twice, so a class name does not tell its "
                         "label; give a file whose classes have distinct names.")
    return ReferenceClasses(path=os.path.abspath(ref), fingerprint=fingerprint(beton), class_names=list(names))


def relabel(source: SourceDataset, ref: ReferenceClasses, what: str = "class") -> SourceDataset:
    """Give `source` the labels and class names of `ref`, matching classes by name (in place; returned). A class of
    `source` that `ref` lacks is refused; `ref`'s classes that `source` lacks keep their labels with no samples
    (one warning). `what` names a class of the source in messages ('class folder')."""
    index = {name: i for i, name in enumerate(ref.class_names)}
    foreign = [name for name in source.class_names if name not in index]
    # a label list's classes are its lines', not the image folder's
    origin = (source.provenance.get("label_list") or {}).get("path", source.root)
    if foreign:
        shown = ", ".join(map(repr, foreign[:5])) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        what, are, them = (what, "is not a class", "it") if len(foreign) == 1 else (
            what + ("es" if what.endswith("s") else "s"), "are not classes", "them")
        raise InputError(f"{len(foreign)} {what} of {origin} {are} of --classes-from {ref.path} "
                         f"({shown}); give the reference file of the same dataset, or remove {them} from the source.")
    mapping = np.asarray([index[name] for name in source.class_names], dtype=np.int64)
    present = np.zeros(len(ref.class_names), dtype=bool)
    present[mapping[np.unique(source.labels)]] = True
    if not present.all():
        lacking = int((~present).sum())
        log.warning("%d of the %d classes of %s %s no samples in %s; %s kept with no samples", lacking,
                    len(ref.class_names), ref.path, "has" if lacking == 1 else "have", origin,
                    "its label is" if lacking == 1 else "their labels are")
    source.labels = mapping[source.labels]
    source.class_names = list(ref.class_names)
    source.provenance = {**source.provenance, "classes_from": {"path": ref.path, "fingerprint": ref.fingerprint}}
    return source
