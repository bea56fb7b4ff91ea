"""Atomic writes into the cache folder: a folder is built under a temporary sibling name and
renamed into place only when complete, so a crash or Ctrl-C never leaves a half-written entry."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_folder(dest: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``dest`` (not yet created); when the block succeeds it
    replaces ``dest``, when it fails it is removed and ``dest`` is left as it was."""
    tmp = dest.with_name(f"{dest.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        if dest.exists():
            shutil.rmtree(dest)
        os.rename(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
