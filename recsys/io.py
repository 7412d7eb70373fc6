"""Writing outputs so that nothing is ever left half-done and nothing stored is lost.

An output directory is built under a temporary sibling name and renamed into place only when the
whole job succeeded. An existing output is replaced only when asked (``overwrite``), and then by a
rename swap, so at every instant either the old or the new complete output exists.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from recsys.errors import OutputExistsError, RecsysError


def check_output_dir(out: str | Path, *, overwrite: bool) -> Path:
    """Fail early (before any work) when ``out`` holds data and ``overwrite`` is false."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise OutputExistsError(f"output {path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise OutputExistsError(f"output directory {path} is not empty; pass --overwrite to replace it")
    return path


@contextlib.contextmanager
def atomic_output_dir(out: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a staging directory that becomes ``out`` when the ``with`` block succeeds.

    On an exception the staging directory is removed and ``out`` is untouched.

    Example:
        >>> import tempfile
        >>> root = Path(tempfile.mkdtemp())
        >>> with atomic_output_dir(root / "run") as tmp:
        ...     _ = (tmp / "a.txt").write_text("done")
        >>> (root / "run" / "a.txt").read_text()
        'done'
    """
    path = check_output_dir(out, overwrite=overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex[:8]
    staging = path.with_name(f".{path.name}.partial-{token}")
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old-{token}")
        os.rename(path, old)
    try:
        os.rename(staging, path)
    except OSError as exc:
        if old is not None:
            os.rename(old, path)
        shutil.rmtree(staging, ignore_errors=True)
        raise RecsysError(f"cannot move the finished output into {path}: {exc}") from exc
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_json(path: str | Path, data: Any) -> None:
    """Write JSON via a temporary file and a rename (readers never see a partial file)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_json(path: str | Path, *, what: str) -> Any:
    """Read a JSON file, turning a missing or malformed file into a one-line error."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RecsysError(f"{what} not found: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RecsysError(f"cannot read {what} {path}: {exc}") from None


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()
