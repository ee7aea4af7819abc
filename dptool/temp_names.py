"""The hidden temporary names outputs are written under before their rename (``.NAME.tmp-PID-HOST-RANDOM``): made
by `temp_path_for` for `dptool.atomic`, recognised by `_TEMP_SUFFIX` when `dptool.output_checks` sweeps the ones
that interrupted runs left."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import socket
from pathlib import Path

__all__ = ["temp_path_for"]


def _host_tag() -> str:
    """8 hex digits naming this machine, boot and PID namespace: a PID means the same process only among
    temporary names that carry the same tag (containers sharing a volume, two hosts on NFS have other tags)."""
    parts = [socket.gethostname()]
    with contextlib.suppress(OSError):
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
    with contextlib.suppress(OSError):
        parts.append(os.readlink("/proc/self/ns/pid"))
    return hashlib.blake2b("\0".join(parts).encode(), digest_size=4).hexdigest()


_TAG = _host_tag()
# what follows ".NAME.tmp-": PID-TAG-RANDOM, or the PID alone (the names of dptool before 2026-11-29)
_TEMP_SUFFIX = re.compile(r"(?P<pid>\d+)(?:-(?P<tag>[0-9a-f]{8})-[0-9a-f]{8})?")


def temp_path_for(path: Path) -> Path:
    """A hidden temporary name beside `path`, unique to this call: ``.NAME.tmp-PID-HOST-RANDOM``."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{_TAG}-{secrets.token_hex(4)}")
