"""Columns written to disk piece by piece, and Arrow IPC files written from them without reading
them back into memory: the out-of-core build's way to write stores larger than memory.

The history store and the category index are each one Arrow IPC file holding a single record
batch (so that they memory-map with zero copies, features/history.py). The out-of-core build
produces their columns in pieces, one user partition at a time, and appends each piece to a raw
file (:class:`SpilledColumn`). :func:`write_ipc_file` then hands pyarrow's own IPC writer a record
batch whose buffers are read-only memory maps of those files. pyarrow writes each body buffer as
one call to the sink's ``write``; the sink recognises a buffer that lies in one of the maps and
copies the bytes file to file (``os.copy_file_range``, or ``os.pread`` in 64 MiB pieces where the
kernel or file system lacks it), so the maps' pages are never touched and the process's memory
does not grow with the store. Everything else (the schema, the batch's metadata, padding, the
footer) is written as pyarrow produces it, so the file is byte for byte the one that writing the
same arrays from memory gives.

Example:
    >>> import tempfile
    >>> root = Path(tempfile.mkdtemp())
    >>> col = SpilledColumn(root / "item.bin", np.int32)
    >>> col.append(np.array([1, 2])); col.append(np.array([3]))
    >>> col.close()
    >>> batch = pa.record_batch([col.array()], names=["item"])
    >>> write_ipc_file(root / "t.arrow", batch, [col])   # bytes copied file to file
    12
    >>> pa.ipc.open_file(root / "t.arrow").get_batch(0).column(0).to_pylist()
    [1, 2, 3]
"""

from __future__ import annotations

import errno
import io
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

_PIECE = 64 << 20  # bytes per pread when copy_file_range is not available


class SpilledColumn:
    """A column of fixed-width values appended to a raw file (native byte order, no header)."""

    def __init__(self, path: str | Path, dtype: np.dtype | type) -> None:
        self.path = Path(path)
        self.dtype = np.dtype(dtype)
        self.length = 0
        self._file: io.BufferedWriter | None = open(self.path, "wb")  # noqa: SIM115 (closed by close())
        self._map: np.ndarray | None = None

    def append(self, values: np.ndarray) -> None:
        """Append ``values`` (cast to the column's dtype)."""
        if self._file is None:
            raise ValueError(f"{self.path.name} is closed: nothing can be appended")
        values = np.ascontiguousarray(values, dtype=self.dtype)
        self._file.write(memoryview(values).cast("B"))
        self.length += len(values)

    def append_file(self, path: str | Path, *, add: int = 0) -> None:
        """Append the raw values in ``path`` (same dtype), ``add`` added to each, and delete it.
        Read in pieces of 64 MiB, so memory does not grow with the file."""
        if self._file is None:
            raise ValueError(f"{self.path.name} is closed: nothing can be appended")
        step = max(_PIECE // self.dtype.itemsize, 1)
        total = Path(path).stat().st_size // self.dtype.itemsize
        for start in range(0, total, step):
            values = np.fromfile(path, dtype=self.dtype, count=min(step, total - start), offset=start * self.dtype.itemsize)
            self.append(values + add if add else values)
        Path(path).unlink()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def array(self) -> pa.Array:
        """The column as an Arrow array over a read-only memory map of its file (no copy, no read)."""
        self.close()
        if self._map is None:
            self._map = (np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.length,)) if self.length
                         else np.empty(0, dtype=self.dtype))
        return pa.Array.from_buffers(pa.from_numpy_dtype(self.dtype), self.length, [None, pa.py_buffer(self._map)])

    def span(self) -> tuple[int, int]:
        """``(address, bytes)`` of the memory map (after :meth:`array`); (0, 0) when empty."""
        if self._map is None or not self.length:
            return 0, 0
        return int(self._map.ctypes.data), int(self._map.nbytes)


class _Sink(io.RawIOBase):
    """What pyarrow's IPC writer writes to: buffers inside a spilled column's map are copied from its
    file; anything else is written as given."""

    def __init__(self, out: io.FileIO, columns: list[SpilledColumn]) -> None:
        super().__init__()
        self.out = out
        self.spans = [(*c.span(), c.path) for c in columns if c.span()[1]]
        self.copied = 0  # bytes copied file to file (tests check that none were read through memory)

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:  # noqa: ANN001 (bytes or pa.Buffer)
        if isinstance(data, pa.Buffer) and data.size:
            for base, size, path in self.spans:
                if base <= data.address and data.address + data.size <= base + size:
                    self._copy(path, data.address - base, data.size)
                    return data.size
        view = memoryview(data)
        written = 0
        while written < view.nbytes:
            written += self.out.write(view[written:])
        return written

    def _copy(self, path: Path, offset: int, count: int) -> None:
        done = 0
        with open(path, "rb", buffering=0) as src:
            try:
                while done < count:
                    n = os.copy_file_range(src.fileno(), self.out.fileno(), count - done, offset + done)
                    if n == 0:
                        break
                    done += n
            except (AttributeError, OSError) as exc:  # no copy_file_range here, or not between these files
                if isinstance(exc, OSError) and exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                    raise
            while done < count:
                piece = os.pread(src.fileno(), min(_PIECE, count - done), offset + done)
                if not piece:
                    raise OSError(f"{path} ends {count - done:,} bytes before the column it holds")
                written = 0
                while written < len(piece):
                    written += self.out.write(piece[written:])
                done += len(piece)
        self.copied += count

def write_ipc_file(path: str | Path, batch: pa.RecordBatch, columns: list[SpilledColumn]) -> int:
    """Write ``batch`` as a one-batch Arrow IPC file at ``path``; the buffers of ``batch`` that are
    views of ``columns`` (their :meth:`SpilledColumn.array`) are copied from the columns' files.

    Returns:
        The bytes copied file to file.
    """
    with open(path, "wb", buffering=0) as out:
        sink = _Sink(out, columns)
        with ipc.new_file(pa.PythonFile(sink, mode="w"), batch.schema) as writer:
            writer.write_batch(batch)
        return sink.copied
