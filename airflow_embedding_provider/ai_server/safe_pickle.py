"""Load a pickled DataFrame without letting the file run code or forge memory.

A pickle names the callables that rebuild its objects, so loading an untrusted one can call
``os.system`` or anything else importable. :func:`load` refuses such a file with
:class:`UnsafePickleError` by three rules:

1. Only the exact ``(module, name)`` pairs that pandas, numpy and pyarrow pickles of plain data
   use (:data:`ALLOWED`) are looked up, and any other pair is refused *before its module is
   imported*: importing can itself run code (``numpy.f2py.__main__`` runs f2py's command line).
2. A call, an object creation or a state update applies only to what the file named through
   rule 1; ``getattr`` reaches one attribute of one class (the time-zone pickles need it).
3. numpy dtypes and arrays are rebuilt through a checked path: a dtype's state must be the
   state numpy itself writes for that dtype (forged flags turn an object dtype into raw bytes,
   and raw bytes read as object pointers crash the process), an array is built once, from such
   a dtype, object arrays only from lists of objects; a frame's blocks must cover its columns
   exactly; pyarrow arrays are validated in full before anything reads them.

Any other failure of a damaged file ends as :class:`pickle.UnpicklingError`, one line.
The loader is the standard library's pure-Python unpickler with those operations replaced (the
C one cannot be hooked between an object and its state); it is about 2-3.5x slower than the C
one (bench/RESULTS.md), and ``--trust-pickle`` skips it.
"""

from __future__ import annotations

import gzip
import pickle
import struct
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, ClassVar, cast

import numpy as np

_NULLABLE_INTS = ("Int8", "Int16", "Int32", "Int64", "UInt8", "UInt16", "UInt32", "UInt64")
_NULLABLE_FLOATS = ("Float32", "Float64")
_OFFSETS = (
    "Day",
    "Hour",
    "Minute",
    "Second",
    "Milli",
    "Micro",
    "Nano",
    "Week",
    "BusinessDay",
    "MonthEnd",
    "MonthBegin",
    "QuarterEnd",
    "QuarterBegin",
    "YearEnd",
    "YearBegin",
)
#: Every (module, name) a pickle may name: what frames written by pandas 2.3-3.1 with numpy
#: 1.26-2.4 (with and without pyarrow) ask for, with the extra column types real files carry
#: (dates with and without time zones, timedelta, Period, Interval, Decimal, nullable and string
#: dtypes, categoricals, Timestamp/NaT/bytes/bool/list cells); tests/unit/ai_server loads such
#: frames at every protocol, and files that older versions wrote (its pickles/ folder).
ALLOWED: frozenset[tuple[str, str]] = frozenset(
    {
        # numpy 2 spells its core module numpy._core; files from numpy 1.x say numpy.core
        ("numpy", "dtype"),
        ("numpy", "ndarray"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.multiarray", "scalar"),
        # frames, indexes and the block manager (pandas 3 names its public path, pandas 2 the module)
        ("pandas", "DataFrame"),
        ("pandas.core.frame", "DataFrame"),
        ("pandas", "Index"),
        ("pandas.core.indexes.base", "Index"),
        ("pandas.core.indexes.base", "_new_Index"),
        ("pandas", "RangeIndex"),
        ("pandas.core.indexes.range", "RangeIndex"),
        ("pandas", "DatetimeIndex"),
        ("pandas.core.indexes.datetimes", "DatetimeIndex"),
        ("pandas.core.indexes.datetimes", "_new_DatetimeIndex"),
        ("pandas.core.internals.managers", "BlockManager"),
        ("pandas._libs.internals", "_unpickle_block"),
        ("pandas._libs.arrays", "__pyx_unpickle_NDArrayBacked"),
        # extension arrays and their dtypes
        ("pandas.arrays", "DatetimeArray"),
        ("pandas.core.arrays.datetimes", "DatetimeArray"),
        ("pandas.arrays", "TimedeltaArray"),
        ("pandas.core.arrays.timedeltas", "TimedeltaArray"),
        ("pandas.arrays", "PeriodArray"),
        ("pandas.core.arrays.period", "PeriodArray"),
        ("pandas.arrays", "IntervalArray"),
        ("pandas.core.arrays.interval", "IntervalArray"),
        ("pandas.arrays", "IntegerArray"),
        ("pandas.core.arrays.integer", "IntegerArray"),
        ("pandas.arrays", "FloatingArray"),
        ("pandas.core.arrays.floating", "FloatingArray"),
        ("pandas.arrays", "BooleanArray"),
        ("pandas.core.arrays.boolean", "BooleanArray"),
        ("pandas.arrays", "StringArray"),
        ("pandas.core.arrays.string_", "StringArray"),
        ("pandas.arrays", "ArrowStringArray"),
        ("pandas.core.arrays.string_arrow", "ArrowStringArray"),
        ("pandas", "Categorical"),
        ("pandas.core.arrays.categorical", "Categorical"),
        ("pandas", "CategoricalDtype"),
        ("pandas.core.dtypes.dtypes", "CategoricalDtype"),
        ("pandas", "DatetimeTZDtype"),
        ("pandas.core.dtypes.dtypes", "DatetimeTZDtype"),
        ("pandas", "PeriodDtype"),
        ("pandas.core.dtypes.dtypes", "PeriodDtype"),
        ("pandas", "IntervalDtype"),
        ("pandas.core.dtypes.dtypes", "IntervalDtype"),
        ("pandas", "StringDtype"),
        ("pandas.core.arrays.string_", "StringDtype"),
        *(("pandas", f"{kind}Dtype") for kind in _NULLABLE_INTS + _NULLABLE_FLOATS),
        *(("pandas.core.arrays.integer", f"{kind}Dtype") for kind in _NULLABLE_INTS),
        *(("pandas.core.arrays.floating", f"{kind}Dtype") for kind in _NULLABLE_FLOATS),
        ("pandas", "BooleanDtype"),
        ("pandas.core.arrays.boolean", "BooleanDtype"),
        # scalars in object columns
        ("pandas", "NA"),
        ("pandas._libs.missing", "NA"),
        ("pandas._libs.tslibs.nattype", "_nat_unpickle"),
        ("pandas._libs.tslibs.nattype", "__nat_unpickle"),
        ("pandas._libs.tslibs.timestamps", "_unpickle_timestamp"),
        ("pandas._libs.tslibs.timedeltas", "_timedelta_unpickle"),
        ("pandas", "Period"),
        ("pandas._libs.tslibs.period", "Period"),
        ("pandas", "Interval"),
        ("pandas._libs.interval", "Interval"),
        *(("pandas._libs.tslibs.offsets", name) for name in _OFFSETS),  # a Period's frequency
        ("pandas._libs.interval", "__pyx_unpickle_IntervalMixin"),
        # pandas 3 keeps text in Arrow arrays when pyarrow is installed
        ("pyarrow.lib", "_restore_array"),
        ("pyarrow.lib", "py_buffer"),
        ("pyarrow.lib", "type_for_alias"),
        # time zones: zoneinfo (pandas 3), pytz (pandas 2), the standard library's fixed offsets
        ("zoneinfo", "ZoneInfo"),
        ("pytz", "_p"),
        ("pytz", "_UTC"),
        ("datetime", "timezone"),
        # plain Python values
        ("datetime", "datetime"),
        ("datetime", "date"),
        ("datetime", "time"),
        ("datetime", "timedelta"),
        ("decimal", "Decimal"),
        ("uuid", "UUID"),
        ("_codecs", "encode"),  # how protocol 2 writes bytes
        ("builtins", "slice"),
        ("builtins", "bytearray"),
        ("builtins", "bytes"),
        ("builtins", "complex"),
        ("builtins", "set"),
        ("builtins", "frozenset"),
        ("builtins", "getattr"),  # checked: only the attributes in _GETATTR
    }
)
#: ``getattr`` as a pickle uses it, to name a class method: only these.
_GETATTR = frozenset({("zoneinfo", "ZoneInfo", "_unpickle")})
_NUMPY_DTYPE_STATE_VERSIONS = (3, 4)
_DEFLATE_MAX_RATIO = 1032  # the most deflate can expand a byte

_REFUSAL_ADVICE = (
    "Only plain DataFrames are loaded; save the data as Parquet (DataFrame.to_parquet), or pass "
    "--trust-pickle if the file comes from a source you trust"
)


#: dtypes that passed :func:`_check_dtype`, by id (kept alive here so that an id is never reused)
_CHECKED_DTYPES: dict[int, np.dtype[Any]] = {}


class UnsafePickleError(ValueError):
    """The pickle asks for something that is not plain pandas/numpy data."""


def _refuse(what: str) -> UnsafePickleError:
    return UnsafePickleError(
        f"refusing to load {what}: the file asks for more than pandas/numpy data. {_REFUSAL_ADVICE}"
    )


class _Pending:
    """A numpy dtype or array named by the file, built only when its state arrives and passes
    the checks (so nothing can use it half-built, and it is built exactly once)."""

    __slots__ = ("args", "kind", "memo_keys")

    def __init__(self, kind: str, args: tuple[Any, ...]) -> None:
        self.kind = kind
        self.args = args
        self.memo_keys: list[int] = []


def _checked_dtype(args: tuple[Any, ...], state: Any) -> np.dtype[Any]:
    """``np.dtype(*args)`` with ``state`` applied, if the state is what numpy writes for it."""
    if not (1 <= len(args) <= 3 and isinstance(args[0], str) and len(args[0]) <= 16):
        raise _refuse(f"a numpy dtype made from {args!r:.60}")
    if not (isinstance(state, tuple) and len(state) in (8, 9) and state[0] in _NUMPY_DTYPE_STATE_VERSIONS):
        raise _refuse("a numpy dtype with an unknown state")
    subarray, names, fields = state[2:5]
    if subarray is not None or names is not None or fields is not None:
        raise _refuse("a structured numpy dtype")  # no DataFrame column is one
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in state[5:8]):
        raise _refuse("a numpy dtype with a malformed state")
    scratch = np.dtype(args[0], False, True)  # a private copy: nothing else holds it
    cast(Any, scratch).__setstate__(state)
    canonical = np.dtype(scratch.str)
    if _without_empty_metadata(cast(tuple[Any, ...], canonical.__reduce__()[2])) != _without_empty_metadata(state):
        raise _refuse(f"a numpy {canonical.str} dtype whose state is not numpy's own (flags {state[7]!r})")
    return np.dtype(canonical, False, True)  # a copy, as numpy itself unpickles one


def _without_empty_metadata(state: tuple[Any, ...]) -> tuple[Any, ...]:
    """Date dtypes' states end in (metadata, unit): some numpy versions write ``{}`` for none."""
    if len(state) == 9 and isinstance(state[8], tuple) and len(state[8]) == 2 and state[8][0] == {}:
        return (*state[:8], (None, state[8][1]))
    return state


def _check_dtype(dtype: Any) -> np.dtype[Any]:
    if _CHECKED_DTYPES.get(id(dtype)) is dtype:
        return cast(np.dtype[Any], dtype)
    if not isinstance(dtype, np.dtype):
        raise _refuse(f"a numpy array of a {type(dtype).__name__} instead of a dtype")
    if dtype.fields is not None or dtype.subdtype is not None or dtype.flags != np.dtype(dtype.str).flags:
        raise _refuse(f"a numpy array of an unchecked dtype {dtype.str}")
    if len(_CHECKED_DTYPES) < 1024:  # a dtype is never changed once built (no second state update)
        _CHECKED_DTYPES[id(dtype)] = dtype
    return dtype


def _checked_array(reconstruct: Callable[..., Any], state: Any) -> np.ndarray[Any, Any]:
    """An array from ``ndarray.__setstate__`` state, object arrays from lists only."""
    if not (isinstance(state, tuple) and len(state) == 5 and state[0] == 1):
        raise _refuse("a numpy array with an unknown state")
    _, shape, dtype, _fortran, data = state
    _check_dtype(dtype)
    if not (isinstance(shape, tuple) and all(isinstance(n, int) and n >= 0 for n in shape)):
        raise _refuse("a numpy array with a malformed shape")
    if dtype.hasobject != isinstance(data, list):
        raise _refuse(f"a numpy {dtype.str} array built from {type(data).__name__}")
    if not dtype.hasobject and not isinstance(data, (bytes, bytearray)):
        raise _refuse(f"a numpy array built from {type(data).__name__}")
    array: np.ndarray[Any, Any] = reconstruct(np.ndarray, (0,), b"b")
    array.__setstate__(state)
    return array


def _frombuffer(real: Callable[..., Any], args: tuple[Any, ...]) -> Any:
    if len(args) != 4 or not isinstance(args[0], (bytes, bytearray, pickle.PickleBuffer)):
        raise _refuse("a numpy array from something other than a buffer")
    dtype = _check_dtype(args[1])
    if dtype.hasobject:
        raise _refuse("a numpy object array from raw bytes")
    return real(*args)


def _scalar(real: Callable[..., Any], args: tuple[Any, ...]) -> Any:
    if len(args) not in (1, 2):
        raise _refuse("a numpy scalar with unknown arguments")
    dtype = _check_dtype(args[0])
    if len(args) == 2 and not dtype.hasobject and not isinstance(args[1], bytes):
        raise _refuse("a numpy scalar from something other than bytes")
    return real(*args)


def _getattr(_real: Callable[..., Any], args: tuple[Any, ...]) -> Any:
    if len(args) == 2 and isinstance(args[0], type) and isinstance(args[1], str):
        cls, name = args
        if (cls.__module__, cls.__qualname__, name) in _GETATTR:
            return getattr(cls, name)
    raise _refuse(f"getattr{tuple(map(str, args))!r:.80}")


def _encode(real: Callable[..., Any], args: tuple[Any, ...]) -> Any:
    """How protocol 2 writes bytes: ``_codecs.encode(text, "latin1")``, that codec only."""
    if len(args) != 2 or not isinstance(args[0], str) or args[1] != "latin1":
        raise _refuse(f"_codecs.encode with {args[1:]!r:.40}")
    return real(*args)


def _placement(placement: Any, items: int) -> list[int]:
    if isinstance(placement, slice):
        return list(range(*placement.indices(items))) if placement.stop is not None else []
    indexer = getattr(placement, "indexer", placement)
    if isinstance(indexer, slice):
        return _placement(indexer, items)
    values = np.asarray(indexer)
    if values.dtype.kind not in "iu" or values.ndim != 1:
        raise _refuse("a block placed by something other than column numbers")
    return [int(v) for v in values]


def _block_manager(real: Callable[..., Any], args: tuple[Any, ...]) -> Any:
    """pandas' block manager, if its blocks hold each column exactly once: pandas rebuilds its
    column map from the placements without checking them against the number of columns."""
    if len(args) != 2 or not isinstance(args[0], (tuple, list)) or not isinstance(args[1], (tuple, list)):
        raise _refuse("a pandas block manager with unknown arguments")  # a third one skips pandas' own checks
    blocks, axes = args
    if len(axes) != 2:
        raise _refuse("a pandas block manager that is not two-dimensional")
    items, rows = len(axes[0]), len(axes[1])
    seen: list[int] = []
    for block in blocks:
        placed = _placement(getattr(block, "mgr_locs", None), items)
        shape = getattr(getattr(block, "values", None), "shape", None)
        if not (isinstance(shape, tuple) and 1 <= len(shape) <= 2 and shape[-1] == rows):
            raise _refuse("a pandas block whose values do not match the frame's rows")
        if len(placed) != (shape[0] if len(shape) == 2 else 1):
            raise _refuse("a pandas block whose values do not match its columns")
        seen.extend(placed)
    if sorted(seen) != list(range(items)):
        raise _refuse("a pandas frame whose blocks do not cover its columns exactly once")
    return real(*args)


def _restore_arrow(real: Callable[..., Any], args: tuple[Any, ...]) -> Any:
    array = real(*args)
    try:
        array.validate(full=True)
    except Exception as exc:  # pyarrow.lib.ArrowInvalid and its kin
        raise _refuse(f"an Arrow array that fails validation ({str(exc).splitlines()[0][:80]})") from None
    return array


class _Checked(pickle._Unpickler):
    """The pure-Python unpickler with each operation that calls, creates or updates checked."""

    dispatch: ClassVar[dict[int, Callable[[Any], None]]] = dict(pickle._Unpickler.dispatch)
    # what pickle._Unpickler keeps on itself (not in its type stubs)
    stack: list[Any]
    memo: dict[int, Any]
    proto: int
    fix_imports: bool
    append: Callable[[Any], None]
    read: Callable[[int], bytes]
    readline: Callable[[], bytes]
    readinto: Callable[[bytearray], int]
    pop_mark: Callable[[], list[Any]]

    def __init__(self, file: _Bounded) -> None:
        super().__init__(file)
        self._limit = file.limit
        self._named: dict[int, Any] = {}  # id -> what find_class returned (kept alive)
        self._special: dict[int, Callable[[Callable[..., Any], tuple[Any, ...]], Any]] = {}

    def find_class(self, module: str, name: str) -> Any:
        if self.proto < 3 and self.fix_imports:
            import _compat_pickle

            module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
            module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if not all(part.isidentifier() for part in (*module.split("."), *name.split("."))):
            raise pickle.UnpicklingError(f"no Python object is called {module[:40]!r} {name[:40]!r}")  # not a pickle
        if (module, name) not in ALLOWED:
            raise UnsafePickleError(
                f"refusing to load {module}.{name}: the file asks for more than pandas/numpy data. {_REFUSAL_ADVICE}"
            )
        found = super().find_class(module, name)
        self._named[id(found)] = found
        handler = _HANDLERS.get((module, name))
        if handler is not None:
            self._special[id(found)] = handler
        return found

    def _is_named(self, obj: object) -> bool:
        return self._named.get(id(obj)) is obj

    # -- calls and object creation ------------------------------------------------------------
    def _call(self, func: Any, args: Any) -> Any:
        if not isinstance(args, tuple):
            raise pickle.UnpicklingError("a call whose arguments are not a tuple")
        if func is np.dtype:
            return _Pending("dtype", args)
        if not self._is_named(func):
            raise _refuse(f"a call of a {type(func).__name__} the file built itself")
        if isinstance(func, type) and issubclass(func, (np.ndarray, np.dtype)):
            raise _refuse(f"numpy.{func.__name__}(...) called directly")
        handler = self._special.get(id(func))
        if handler is _reconstruct_marker:
            if args != (np.ndarray, (0,), b"b"):
                raise _refuse("a numpy array reconstructed with unknown arguments")
            return _Pending("array", (func,))
        result = handler(func, args) if handler is not None else func(*args)
        if handler is _getattr:
            self._named[id(result)] = result  # the class method it named may now be called
        return result

    def _new(self, cls: Any, args: Any, kwargs: Any) -> Any:
        if not isinstance(cls, type) or not self._is_named(cls):
            raise _refuse(f"a new object of a {type(cls).__name__} the file built itself")
        if issubclass(cls, (np.ndarray, np.dtype)) or id(cls) in self._special:
            raise _refuse(f"a {cls.__name__} made without its checks")
        return cls.__new__(cls, *args, **kwargs)

    def load_reduce(self) -> None:
        stack = self.stack
        args = stack.pop()
        stack[-1] = self._call(stack[-1], args)

    dispatch[pickle.REDUCE[0]] = load_reduce

    def load_newobj(self) -> None:
        stack = self.stack
        args = stack.pop()
        cls = stack.pop()
        stack.append(self._new(cls, args, {}))

    dispatch[pickle.NEWOBJ[0]] = load_newobj

    def load_newobj_ex(self) -> None:
        stack = self.stack
        kwargs = stack.pop()
        args = stack.pop()
        cls = stack.pop()
        stack.append(self._new(cls, args, kwargs))

    dispatch[pickle.NEWOBJ_EX[0]] = load_newobj_ex

    def _instantiate(self, klass: Any, args: Any) -> None:  # INST and OBJ (protocols 0 and 1)
        self.stack.append(self._call(klass, tuple(args)))

    # -- state updates ------------------------------------------------------------------------
    def load_build(self) -> None:
        stack = self.stack
        state, inst = stack[-1], stack[-2]
        if type(inst) is _Pending:
            stack.pop()
            built = _checked_dtype(inst.args, state) if inst.kind == "dtype" else _checked_array(inst.args[0], state)
            stack[-1] = built
            for key in inst.memo_keys:
                if self.memo.get(key) is inst:
                    self.memo[key] = built
            return
        cls = type(inst)
        if isinstance(inst, (np.ndarray, np.dtype)):
            raise _refuse(f"a second state update of a numpy {'array' if isinstance(inst, np.ndarray) else 'dtype'}")
        if not self._is_named(cls) or issubclass(cls, (np.ndarray, np.dtype)) or id(cls) in self._special:
            raise _refuse(f"a state update of a {cls.__name__} the file did not name")
        super().load_build()  # type: ignore[misc]

    dispatch[pickle.BUILD[0]] = load_build

    def load_appends(self) -> None:
        items = self.pop_mark()
        target = self.stack[-1]
        if not isinstance(target, list):
            raise pickle.UnpicklingError(f"appending to a {type(target).__name__}")
        target.extend(items)

    dispatch[pickle.APPENDS[0]] = load_appends

    def load_append(self) -> None:
        value = self.stack.pop()
        target = self.stack[-1]
        if not isinstance(target, list):
            raise pickle.UnpicklingError(f"appending to a {type(target).__name__}")
        target.append(value)

    dispatch[pickle.APPEND[0]] = load_append

    def load_setitems(self) -> None:
        items = self.pop_mark()
        target = self.stack[-1]
        if not isinstance(target, dict) or len(items) % 2:
            raise pickle.UnpicklingError(f"setting items of a {type(target).__name__}")
        for i in range(0, len(items), 2):
            target[items[i]] = items[i + 1]

    dispatch[pickle.SETITEMS[0]] = load_setitems

    def load_setitem(self) -> None:
        stack = self.stack
        value = stack.pop()
        key = stack.pop()
        if not isinstance(stack[-1], dict):
            raise pickle.UnpicklingError(f"setting an item of a {type(stack[-1]).__name__}")
        stack[-1][key] = value

    dispatch[pickle.SETITEM[0]] = load_setitem

    def load_additems(self) -> None:
        items = self.pop_mark()
        target = self.stack[-1]
        if not isinstance(target, set):
            raise pickle.UnpicklingError(f"adding items to a {type(target).__name__}")
        target.update(items)

    dispatch[pickle.ADDITEMS[0]] = load_additems

    def load_bytearray8(self) -> None:  # allocates before it reads: the size must fit the file
        (size,) = struct.unpack("<Q", self.read(8))
        if size > self._limit:
            raise pickle.UnpicklingError(f"a {size}-byte array in a file that cannot hold it")
        data = bytearray(size)
        self.readinto(data)
        self.append(data)

    dispatch[pickle.BYTEARRAY8[0]] = load_bytearray8

    # -- the memo: a pending dtype or array is replaced there too once built ------------------
    def _remember(self, key: int) -> None:
        top = self.stack[-1]
        self.memo[key] = top
        if type(top) is _Pending:
            top.memo_keys.append(key)

    def load_put(self) -> None:
        key = int(self.readline()[:-1])
        if key < 0:
            raise pickle.UnpicklingError("negative PUT argument")
        self._remember(key)

    dispatch[pickle.PUT[0]] = load_put

    def load_binput(self) -> None:
        self._remember(self.read(1)[0])

    dispatch[pickle.BINPUT[0]] = load_binput

    def load_long_binput(self) -> None:
        (key,) = struct.unpack("<I", self.read(4))
        self._remember(key)

    dispatch[pickle.LONG_BINPUT[0]] = load_long_binput

    def load_memoize(self) -> None:  # the most frequent operation: inlined
        memo, top = self.memo, self.stack[-1]
        key = len(memo)
        memo[key] = top
        if type(top) is _Pending:
            top.memo_keys.append(key)

    dispatch[pickle.MEMOIZE[0]] = load_memoize


def _reconstruct_marker(_real: Callable[..., Any], _args: tuple[Any, ...]) -> Any:  # pragma: no cover
    raise AssertionError("handled in _Checked._call")


_HANDLERS: dict[tuple[str, str], Callable[[Callable[..., Any], tuple[Any, ...]], Any]] = {
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct_marker,
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct_marker,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.multiarray", "scalar"): _scalar,
    ("numpy.core.multiarray", "scalar"): _scalar,
    ("builtins", "getattr"): _getattr,
    ("_codecs", "encode"): _encode,
    ("pandas.core.internals.managers", "BlockManager"): _block_manager,
    ("pyarrow.lib", "_restore_array"): _restore_arrow,
}


class _Bounded:
    """A file that reads only what is there: a damaged length field (``FRAME``, ``BINBYTES8``)
    must not make one read allocate gigabytes before the end of the file is noticed."""

    PIECE = 64 * 1024 * 1024

    def __init__(self, file: IO[bytes] | gzip.GzipFile, limit: int) -> None:
        self._file = file
        self.limit = limit

    def read(self, size: int = -1) -> bytes:
        if 0 <= size <= self.PIECE:
            return self._file.read(size)
        pieces = []
        while size < 0 or size > 0:
            piece = self._file.read(self.PIECE if size < 0 else min(size, self.PIECE))
            if not piece:
                break
            pieces.append(piece)
            size -= len(piece) if size > 0 else 0
        return b"".join(pieces)

    def readline(self) -> bytes:
        return self._file.readline(64 * 1024)  # protocol 0 lines are names and numbers


def _load(stream: IO[bytes] | gzip.GzipFile, limit: int) -> Any:
    try:
        return _Checked(_Bounded(stream, limit)).load()
    except UnsafePickleError:
        raise
    except RecursionError:
        raise pickle.UnpicklingError("nested too deeply") from None
    except Exception as exc:  # a damaged file can fail anywhere: one line, never a traceback
        first = (str(exc).splitlines() or [""])[0][:200]
        raise pickle.UnpicklingError(f"{type(exc).__name__}: {first}") from None


def load(path: Path) -> Any:
    """Unpickle ``path`` (plain or gzip) allowing pandas/numpy data only."""
    size = path.stat().st_size
    with path.open("rb") as raw:
        gzipped = raw.read(2) == b"\x1f\x8b"
    if gzipped:
        with gzip.open(path, "rb") as packed:
            return _load(packed, size * _DEFLATE_MAX_RATIO)
    with path.open("rb") as plain:
        return _load(plain, size)
