"""Writing outputs so that nothing is ever left half-done and nothing stored is lost.

An output directory is built under a hidden sibling name (``.NAME.partial-OWNER-TOKEN``) and put
in place by a rename only when the whole job succeeded. An existing output is replaced only when
asked (``overwrite``), and then by swapping the two directories in one ``renameat2(RENAME_EXCHANGE)``
call (Linux), so at every instant either the old or the new complete output is at ``NAME``. Where
the kernel or file system cannot exchange, two renames are used, and the old output waits under
``.NAME.old-OWNER-TOKEN`` for the instant between them: a crash there is repaired (the old output
is moved back) the next time anything is written to ``NAME``.

``OWNER`` is the writing process, ``PID.START`` (its start time in clock ticks since boot, on
Linux), so that a later run can tell a folder left by a killed writer (removed, with a note) from
one that a live writer is still filling (left alone), even when the pid has been reused.

Before the swap every file of the new output is flushed to disk (``fsync``), and the parent
directory after it, so a power cut cannot leave a renamed directory of empty files.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from recsys.errors import OutputExistsError, RecsysError
from recsys.progress import note

_HIDDEN = re.compile(r"^\.(?P<name>.+)\.(?P<kind>partial|old)-(?P<owner>\d+(?:\.\d+)?)-(?P<token>[0-9a-f]{8})$")
#: Folders written by recsys before owners were recorded (``.NAME.partial-TOKEN``): always stale.
_LEGACY = re.compile(r"^\.(?P<name>.+)\.(?P<kind>partial|old)-(?P<token>[0-9a-f]{8})$")


def check_output_dir(out: str | Path, *, overwrite: bool) -> Path:
    """Fail early (before any work) when ``out`` holds data and ``overwrite`` is false."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise OutputExistsError(f"output {path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise OutputExistsError(f"output directory {path} is not empty; pass --overwrite to replace it")
    return path


# --------------------------------------------------------------------------------------------
# Owners: which process a hidden folder belongs to


def _start_ticks(pid: int) -> str | None:
    """A process's start time in clock ticks since boot (field 22 of /proc/PID/stat), or None
    where /proc is not there or the process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces: split after the last ')'.
    fields = stat[stat.rfind(")") + 2:].split()
    return fields[19] if len(fields) > 19 else None


def owner_tag(pid: int | None = None) -> str:
    """``PID.START`` of this process (``PID`` where the start time is unknown)."""
    pid = os.getpid() if pid is None else pid
    start = _start_ticks(pid)
    return f"{pid}.{start}" if start else str(pid)


def owner_alive(tag: str) -> bool:
    """Whether the process named by an owner tag is still running (and is the same process)."""
    pid_text, _, start = tag.partition(".")
    pid = int(pid_text)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    except OSError:
        return False
    if start:
        now = _start_ticks(pid)
        if now is not None and now != start:  # the pid was reused by another process
            return False
    return True


def hidden_name(path: Path, kind: str, owner: str | None = None) -> Path:
    """``.NAME.KIND-OWNER-TOKEN`` beside ``path`` (``kind``: partial or old)."""
    return path.with_name(f".{path.name}.{kind}-{owner or owner_tag()}-{uuid.uuid4().hex[:8]}")


def hidden_siblings(path: Path) -> list[tuple[Path, str, str | None]]:
    """``(folder, kind, owner)`` of every hidden partial/old folder of ``path`` (owner None: a
    folder written before owners were recorded)."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    out = []
    for entry in sorted(path.parent.iterdir()):
        m = _HIDDEN.match(entry.name) or _LEGACY.match(entry.name)
        if m and m["name"] == path.name and entry.is_dir() and not entry.is_symlink():
            out.append((entry, m["kind"], m.groupdict().get("owner")))
    return out


def recover_output(path: str | Path) -> list[str]:
    """Tidy what killed writers left beside ``path``; return one line per action (also printed).

    * A ``.old`` folder of a dead writer while ``path`` is missing is the previous output, caught
      between the two renames of a swap: it is moved back to ``path``.
    * Every other hidden folder of a dead writer is removed: an unfinished output, or an old one
      already replaced.
    * Folders of live writers are left alone (another process is writing ``path`` now).
    """
    path = Path(path)
    actions = []
    for folder, kind, owner in hidden_siblings(path):
        if owner is not None and owner_alive(owner):
            continue
        if kind == "old" and not path.exists():
            os.rename(folder, path)
            actions.append(f"restored {path} from {folder.name} (a swap was interrupted)")
            continue
        shutil.rmtree(folder, ignore_errors=True)
        what = "unfinished output" if kind == "partial" else "replaced output"
        actions.append(f"removed {folder.name}: the {what} of a writer that was killed")
    for line in actions:
        note(f"[recover] {line}")
    return actions


def live_writer(path: str | Path) -> str | None:
    """The owner tag of a live process writing ``path`` now, or None."""
    for _, kind, owner in hidden_siblings(Path(path)):
        if kind == "partial" and owner is not None and owner_alive(owner):
            return owner
    return None


# --------------------------------------------------------------------------------------------
# Swapping


def fsync_tree(root: str | Path) -> None:
    """Flush every file under ``root`` and the directories themselves to disk."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            file = os.path.join(dirpath, name)
            if os.path.islink(file):
                continue
            fd = os.open(file, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(dirpath)


def fsync_dir(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot fsync a directory; the rename is still atomic
        pass
    finally:
        os.close(fd)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def exchange(a: Path, b: Path) -> bool:
    """Swap two directories in one atomic step; False where the system cannot (then nothing moved)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def commit_output(staging: Path, path: Path) -> None:
    """Put the finished ``staging`` directory at ``path``, replacing what is there (see the module
    docstring for why every instant has a complete output at ``path``)."""
    fsync_tree(staging)
    try:
        if not path.exists():
            os.rename(staging, path)
        elif exchange(staging, path):
            shutil.rmtree(staging, ignore_errors=True)  # now the old output
        else:
            old = hidden_name(path, "old")
            os.rename(path, old)
            os.rename(staging, path)
            shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        raise RecsysError(f"cannot move the finished output into {path}: {exc}") from exc
    fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_output_dir(out: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a staging directory that becomes ``out`` when the ``with`` block succeeds.

    On an exception the staging directory is removed and ``out`` is untouched. What killed
    writers left beside ``out`` is tidied first (:func:`recover_output`); a live writer of the
    same ``out`` is an error.

    Example:
        >>> import tempfile
        >>> root = Path(tempfile.mkdtemp())
        >>> with atomic_output_dir(root / "run") as tmp:
        ...     _ = (tmp / "a.txt").write_text("done")
        >>> (root / "run" / "a.txt").read_text()
        'done'
    """
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_output(path)
    path = check_output_dir(path, overwrite=overwrite)
    writer = live_writer(path)
    if writer is not None:
        raise OutputExistsError(f"output {path} is being written by process {writer.partition('.')[0]} now")
    staging = hidden_name(path, "partial")
    staging.mkdir()
    try:
        yield staging
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        why = disk_full(exc)
        if why:
            kept = "what it held is untouched" if path.exists() else "nothing was written"
            raise RecsysError(f"cannot write {path}: {why} (on the file system of {path.parent}); "
                              f"the job stopped and {kept}") from exc
        raise
    commit_output(staging, path)


#: errno values of a write that found no room: the disk is full, a file passed the size limit
#: (``ulimit -f``), or the user's quota is spent.
DISK_FULL = {errno.ENOSPC: "no space left on the device", errno.EFBIG: "a file would pass the file size limit",
             errno.EDQUOT: "the disk quota is spent"}


def disk_full(exc: BaseException) -> str | None:
    """What a write error says when it is for want of room (:data:`DISK_FULL`), else None. Also
    reads the errors of polars and pyarrow, which carry the OS error in their message."""
    if isinstance(exc, OSError) and exc.errno in DISK_FULL:
        return DISK_FULL[exc.errno]
    text = str(exc)
    for code, why in DISK_FULL.items():
        if f"os error {code})" in text or f"[errno {code}]" in text.lower() or os.strerror(code) in text:
            return why
    return None


@contextlib.contextmanager
def atomic_update_dir(path: str | Path) -> Iterator[Path]:
    """Yield a staging copy of the directory ``path`` (empty when it does not exist) that replaces
    it when the ``with`` block succeeds: for outputs that add files to a directory (``recsys eval``
    adds one split's files to ``RUN/eval``), so that the directory always holds complete sets.

    Files are copied, not hard-linked: a writer that truncates a file in the copy must not
    change the original.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_output(path)
    staging = hidden_name(path, "partial")
    try:
        if path.is_dir():
            shutil.copytree(path, staging, symlinks=True)
        else:
            staging.mkdir()
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    commit_output(staging, path)


def write_json(path: str | Path, data: Any) -> None:
    """Write JSON via a temporary file and a rename (readers never see a partial file)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(json.dumps(data, indent=2, sort_keys=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
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
