"""Stage results cached under ``artifacts/cache/<stage>-<key>/``, keyed by a hash of inputs.

A stage's key is the SHA-256 of a canonical JSON of everything its output depends on (input
file hashes, settings, maskedge version). A finished entry holds ``done.json``; an entry
without it is an interrupted run and is rebuilt. Entries are written into a temporary folder and
renamed into place, so a cache folder is either complete or absent.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_files(paths: list[Path]) -> str:
    """One hash over several files' names (relative order kept) and contents."""
    h = hashlib.sha256()
    for p in paths:
        h.update(Path(p).name.encode())
        h.update(sha256_file(Path(p)).encode())
    return h.hexdigest()


def hash_json(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


class StageCache:
    """Finished stage outputs, one folder per (stage, key)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, stage: str, key: str) -> Path:
        return self.root / f"{stage}-{key[:16]}"

    def lookup(self, stage: str, key: str) -> Path | None:
        folder = self.path(stage, key)
        marker = folder / "done.json"
        if marker.is_file():
            return folder
        return None

    @contextmanager
    def build(self, stage: str, key: str, meta: dict[str, Any]) -> Iterator[Path]:
        """Yield a temporary folder to fill; on success it becomes the cache entry."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{stage}-pid{os.getpid()}-", dir=self.root))
        try:
            yield tmp
            (tmp / "done.json").write_text(json.dumps({"stage": stage, "key": key, **meta},
                                                      indent=2, default=str))
            final = self.path(stage, key)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def clean_partial(self) -> None:
        """Remove temporary folders left by interrupted runs."""
        if not self.root.is_dir():
            return
        for p in self.root.glob(".*-*"):
            if p.is_dir() and not owner_alive(p.name):
                shutil.rmtree(p, ignore_errors=True)


def owner_alive(name: str) -> bool:
    """Whether the process that made temporary folder ``name`` (``...-pid<N>-...``) still runs;
    a concurrent build's work in progress must not be removed."""
    match = re.search(r"-pid(\d+)-", name)
    if not match:
        return False
    pid = int(match.group(1))
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
