"""Arrow arrays built straight from buffers.

``pyarrow.array()`` imports pandas on its first call (to recognise pandas objects),
which costs a job 0.3-1 s of CPU and ~60 MB; the jobs build their few column types
from numpy buffers instead, which never does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["bools", "float_lists", "int_lists", "ints", "strings"]


def _validity(values: Sequence[Any]) -> tuple[Any, int]:
    import pyarrow as pa

    valid = np.fromiter((v is not None for v in values), dtype=bool, count=len(values))
    nulls = int(len(values) - valid.sum())
    if nulls == 0:
        return None, 0
    return pa.py_buffer(np.packbits(valid, bitorder="little").tobytes()), nulls


def strings(values: Sequence[str | None]) -> Any:
    """A ``large_string`` array (``None`` → null)."""
    import pyarrow as pa

    raw = [b"" if v is None else str(v).encode() for v in values]
    offsets = np.zeros(len(raw) + 1, np.int64)
    if raw:
        offsets[1:] = np.cumsum([len(b) for b in raw])
    validity, nulls = _validity(values)
    return pa.Array.from_buffers(pa.large_string(), len(raw),
                                 [validity, pa.py_buffer(offsets.tobytes()), pa.py_buffer(b"".join(raw))], nulls)


def ints(values: Sequence[int | None], type: Any = None) -> Any:
    """An integer array (``int32`` by default; ``None`` → null)."""
    import pyarrow as pa

    type = type or pa.int32()
    arr = np.asarray([0 if v is None else v for v in values], dtype=type.to_pandas_dtype())
    validity, nulls = _validity(values)
    return pa.Array.from_buffers(type, len(values), [validity, pa.py_buffer(arr.tobytes())], nulls)


def bools(values: Sequence[bool]) -> Any:
    """A boolean array."""
    import pyarrow as pa

    bits = np.packbits(np.asarray(values, dtype=bool), bitorder="little")
    return pa.Array.from_buffers(pa.bool_(), len(values), [None, pa.py_buffer(bits.tobytes())])


def _lists(values: Sequence[Sequence[Any] | None], dtype: Any, value_type: Any) -> Any:
    import pyarrow as pa

    flat = [x for v in values if v is not None for x in v]
    offsets = np.zeros(len(values) + 1, np.int32)
    if values:
        offsets[1:] = np.cumsum([0 if v is None else len(v) for v in values])
    child = pa.Array.from_buffers(value_type, len(flat), [None, pa.py_buffer(np.asarray(flat, dtype).tobytes())])
    validity, nulls = _validity(values)
    return pa.Array.from_buffers(pa.list_(value_type), len(values), [validity, pa.py_buffer(offsets.tobytes())],
                                 nulls, children=[child])


def float_lists(values: Sequence[Sequence[float] | None]) -> Any:
    """A ``list<double>`` array."""
    import pyarrow as pa

    return _lists(values, np.float64, pa.float64())


def int_lists(values: Sequence[Sequence[int] | None]) -> Any:
    """A ``list<int32>`` array."""
    import pyarrow as pa

    return _lists(values, np.int32, pa.int32())
