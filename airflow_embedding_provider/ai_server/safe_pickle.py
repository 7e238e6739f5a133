"""Load a pickled DataFrame without letting the file run code.

A pickle names the callables that rebuild its objects, so loading an untrusted one can call
``os.system`` or anything else importable. :func:`load` allows only the names that pandas, numpy
and pyarrow pickles of plain data use (frames, indexes, blocks, arrays, dtypes, a few builtins)
and refuses every other with :class:`UnsafePickleError`, before anything is called.
"""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path
from typing import Any

#: Names (module-independent) that pandas 1.x-3.x and numpy 1.x-2.x pickles of data use.
_PANDAS_NUMPY_NAMES = frozenset(
    {
        # frames, series, indexes and their block managers
        "DataFrame",
        "Series",
        "Index",
        "RangeIndex",
        "MultiIndex",
        "_new_Index",
        "BlockManager",
        "SingleBlockManager",
        "_unpickle_block",
        "new_block",
        "__pyx_unpickle_NDArrayBacked",
        # extension arrays and dtypes of plain values
        "IntegerArray",
        "FloatingArray",
        "BooleanArray",
        "StringArray",
        "ArrowStringArray",
        "Categorical",
        "CategoricalDtype",
        "StringDtype",
        "Int8Dtype",
        "Int16Dtype",
        "Int32Dtype",
        "Int64Dtype",
        "UInt8Dtype",
        "UInt16Dtype",
        "UInt32Dtype",
        "UInt64Dtype",
        "Float32Dtype",
        "Float64Dtype",
        "BooleanDtype",
        "NA",
        "NAType",
        "Timestamp",
        "_unpickle_timestamp",
        "NaT",
        "NaTType",
        "DatetimeIndex",
        "_new_DatetimeIndex",
        # extra columns of dates, durations, periods and intervals (a real file's ``Published``)
        "DatetimeArray",
        "TimedeltaArray",
        "_timedelta_unpickle",
        "PeriodArray",
        "PeriodDtype",
        "Period",
        "IntervalArray",
        "IntervalDtype",
        "Interval",
        "__pyx_unpickle_IntervalMixin",
        "_nat_unpickle",
        # numpy arrays, scalars and dtypes
        "ndarray",
        "dtype",
        "_reconstruct",
        "scalar",
        "_frombuffer",
    }
)
#: pandas 3 keeps text in Arrow arrays when pyarrow is installed; these rebuild them from buffers.
_PYARROW_NAMES = frozenset({"_restore_array", "py_buffer", "type_for_alias", "chunked_array", "_reconstruct_table"})
_BUILTINS = frozenset({"slice", "list", "dict", "tuple", "set", "frozenset", "complex", "bytearray"})
_OTHER = frozenset(
    {
        ("_codecs", "encode"),  # how protocol 2 writes bytes
        ("copyreg", "_reconstructor"),  # rebuilds an object of a class that must itself be allowed
        ("uuid", "UUID"),
        ("datetime", "datetime"),
        ("datetime", "date"),
        ("datetime", "timedelta"),
        ("datetime", "timezone"),
        ("collections", "OrderedDict"),
        ("decimal", "Decimal"),
    }
)


class UnsafePickleError(ValueError):
    """The pickle asks for something that is not plain pandas/numpy data."""


def _allowed(module: str, name: str) -> bool:
    root = module.split(".")[0]
    if root in ("pandas", "numpy"):
        return name in _PANDAS_NUMPY_NAMES
    if root == "pyarrow":
        return name in _PYARROW_NAMES
    if module in ("builtins", "__builtin__"):
        return name in _BUILTINS
    return (module, name) in _OTHER


class _AllowListUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if not _allowed(module, name):
            raise UnsafePickleError(
                f"refusing to load {module}.{name}: the file asks for more than pandas/numpy data. Only plain "
                "DataFrames are loaded; save the data as Parquet (DataFrame.to_parquet), or pass "
                "--trust-pickle if the file comes from a source you trust"
            )
        return super().find_class(module, name)


def load(path: Path) -> Any:
    """Unpickle ``path`` (plain or gzip) allowing pandas/numpy data types only."""
    with path.open("rb") as raw:
        gzipped = raw.read(2) == b"\x1f\x8b"
    if gzipped:
        with gzip.open(path, "rb") as packed:
            return _AllowListUnpickler(packed).load()
    with path.open("rb") as plain:
        return _AllowListUnpickler(plain).load()
