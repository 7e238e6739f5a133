"""The pickle loader: exact (module, name) pairs, numpy dtypes and arrays rebuilt through checks.

Files that could crash the interpreter are loaded in a child process (``load_worker``), so that
a crash fails the test instead of killing pytest.
"""

from __future__ import annotations

import gzip
import io
import pickle
import pickletools
import random
import resource
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from airflow_embedding_provider.ai_server import safe_pickle
from airflow_embedding_provider.ai_server.dataset import load_dataset
from dev.sample import make_sample
from tests.unit.ai_server.frames import rich_frame, variants

REPO = Path(__file__).resolve().parents[3]
PICKLES = Path(__file__).resolve().parent / "pickles"
FUZZ_SEED = 20261201
FUZZ_MUTATIONS = 300
#: A child that tries to allocate more than this fails with MemoryError instead of taking the machine.
CHILD_MEMORY = 4 * 1024**3


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_DATA, (CHILD_MEMORY, CHILD_MEMORY))


def _load_in_children(paths: list[Path], timeout: float = 300) -> list[tuple[str, str]]:
    """(outcome, detail) for each file: LOADED, REFUSED, ERROR (an uncaught exception) or CRASH
    (the child died, e.g. SIGSEGV). A crash costs only its file: a new child goes on after it."""
    results: dict[int, tuple[str, str]] = {}
    start = 0
    while start < len(paths):
        run = subprocess.run(
            [sys.executable, "-m", "tests.unit.ai_server.load_worker", *map(str, paths[start:])],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=timeout,
            preexec_fn=_limit_memory,
        )
        current = None
        for line in run.stdout.splitlines():
            kind, number, *rest = line.split(" ", 2)
            index = start + int(number)
            if kind == "START":
                current = index
            else:
                results[index] = (kind, rest[0] if rest else "")
                current = None
        if run.returncode == 0:
            break
        assert current is not None, run.stderr[-2000:]
        results[current] = ("CRASH", f"exit {run.returncode}: {run.stderr.strip()[-300:]}")
        start = current + 1
    return [results[i] for i in range(len(paths))]


def _dump(path: Path, obj: object, protocol: int = 5, pickler: type[pickle.Pickler] = pickle.Pickler) -> Path:
    buffer = io.BytesIO()
    pickler(buffer, protocol=protocol).dump(obj)
    path.write_bytes(buffer.getvalue())
    return path


# -- real files load, and load exactly ------------------------------------------------------------


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_real_frames_with_every_extra_column_type_load_exactly(tmp_path: Path, protocol: int) -> None:
    for name, frame in variants().items():
        path = _dump(tmp_path / f"{name}.pkl", frame, protocol)
        pd.testing.assert_frame_equal(safe_pickle.load(path), frame, check_exact=True)


def test_gzipped_real_frames_load_exactly(tmp_path: Path) -> None:
    frame = rich_frame()
    frame.to_pickle(tmp_path / "rich.pkl.gz", compression="gzip")
    pd.testing.assert_frame_equal(safe_pickle.load(tmp_path / "rich.pkl.gz"), frame, check_exact=True)


@pytest.mark.parametrize("path", sorted(PICKLES.glob("*.pkl*")), ids=lambda p: p.name)
def test_pickles_written_by_other_pandas_and_numpy_versions_load_as_pandas_loads_them(path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # numpy 2 reading numpy.core from 1.x files
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as fh:
            expected = pickle.load(fh)
        loaded = safe_pickle.load(path)
    pd.testing.assert_frame_equal(loaded, expected, check_exact=True)
    assert {"Published", "published_kyiv", "age", "month", "band", "salary", "views"} <= set(loaded.columns)


def test_a_file_with_extra_column_types_serves(tmp_path: Path) -> None:
    frame = rich_frame()
    data = load_dataset(_dump(tmp_path / "rich.pkl", frame))
    assert sorted(data.ids) == data.ids == sorted(frame["id"])
    expected = np.stack(frame.set_index("id").loc[data.ids, "job_post_vectors"].tolist())
    assert data.vectors.tobytes() == expected.tobytes()


# -- item 1: exact pairs, refused before the module is imported -----------------------------------


def test_an_allowed_name_in_another_module_is_refused_before_that_module_is_imported(tmp_path: Path) -> None:
    # numpy.f2py.__main__ runs f2py's command line on the server's argv when imported.
    f2py = tmp_path / "f2py.pkl"
    f2py.write_bytes(b"\x80\x02cnumpy.f2py.__main__\ndtype\n.")
    run = subprocess.run(
        [sys.executable, "-m", "airflow_embedding_provider.cli", "ai-server", "--pkl", str(f2py), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert run.returncode == 1, (run.returncode, run.stdout, run.stderr)
    assert run.stdout == ""  # f2py prints its usage or warnings when it runs
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "refusing to load numpy.f2py.__main__.dtype" in lines[0], run.stderr
    # The same for other pairs whose name is allowed elsewhere: none of their modules is imported.
    probes = {"numpy.f2py.__main__": "dtype", "pandas.io.formats.style": "DataFrame", "numpy.testing": "ndarray"}
    paths = []
    for module, name in probes.items():
        path = tmp_path / f"{module}.pkl"
        path.write_bytes(b"\x80\x02c" + f"{module}\n{name}\n".encode() + b".")
        paths.append(str(path))
    code = (
        "import sys\n"
        "from airflow_embedding_provider.ai_server.dataset import DatasetError, load_dataset\n"
        f"for p in {paths!r}:\n"
        "    try:\n        load_dataset(p)\n    except DatasetError as e:\n        print('REFUSED', e)\n"
        f"print('IMPORTED', [m for m in {list(probes)!r} if m in sys.modules])\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("REFUSED") == 3 and "IMPORTED []" in run.stdout, run.stdout


# -- item 2: forged numpy state -------------------------------------------------------------------


class _Forged:
    """Pickles as whatever ``__reduce__`` tuple it is given."""

    def __init__(self, reduced: tuple[Any, ...]) -> None:
        self.reduced = reduced

    def __reduce__(self) -> tuple[Any, ...]:
        return self.reduced


def _object_dtype(flags: int) -> _Forged:
    return _Forged((np.dtype, ("O8", False, True), (3, "|", None, None, None, -1, -1, flags)))


def _reconstruct() -> Any:
    return np.ndarray((0,), dtype=np.int8).__reduce__()[0]  # numpy.(_)core.multiarray._reconstruct


def _frame_with_block(tmp_path: Path, name: str, replace: Any) -> Path:
    """A real frame's pickle with its object block (the text columns) replaced by ``replace(block)``."""
    frame = make_sample(4, dimension=4)
    frame = frame.astype({c: object for c in ("id", "Company Name", "English Level", "Primary Keyword")})

    class _Pickler(pickle.Pickler):
        def reducer_override(self, obj: Any) -> Any:
            if isinstance(obj, np.ndarray) and obj.dtype == object and obj.ndim == 2:
                return replace(obj).__reduce__()
            return NotImplemented

    return _dump(tmp_path / name, frame, 5, _Pickler)


def _raw_object_array(flags: int) -> Any:
    def make(block: np.ndarray) -> _Forged:
        state = (1, block.shape, _object_dtype(flags), False, b"\x41" * (8 * block.size))
        return _Forged((_reconstruct(), (np.ndarray, (0,), b"b"), state))

    return make


def test_forged_object_dtype_flags_are_refused_not_a_crash(tmp_path: Path) -> None:
    # dtype('O') with flags 0 is raw bytes to numpy; an array of 0x4141... then holds "pointers".
    forged = _frame_with_block(tmp_path, "dtype-flags-0.pkl", _raw_object_array(flags=0))
    run = subprocess.run(
        [sys.executable, "-m", "airflow_embedding_provider.cli", "ai-server", "--pkl", str(forged), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 1, (run.returncode, run.stderr[-500:])
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "dtype whose state is not numpy's own" in lines[0], run.stderr


def test_other_forged_numpy_and_pandas_states_are_refused_in_one_line(tmp_path: Path) -> None:
    def frombuffer_object(block: np.ndarray) -> _Forged:
        real = np.arange(2.0).__reduce_ex__(5)[0]  # numpy.(_)core.numeric._frombuffer
        return _Forged((real, (bytearray(b"\x41" * 8 * block.size), _object_dtype(63), block.shape, "C")))

    def ndarray_called(block: np.ndarray) -> _Forged:
        return _Forged((np.ndarray, (block.shape, _object_dtype(63), b"\x41" * 8 * block.size)))

    class _Rebuilt:
        """An object dtype, then a second state update of the same (memoized) dtype object."""

        def __reduce__(self) -> tuple[Any, ...]:
            return (_reconstruct(), (np.ndarray, (0,), b"b"), (1, (1,), np.dtype(object), False, ["x"]))

    payloads = {
        # flags right (63), data raw bytes: an object array must come from a list of objects
        "bytes-into-object": _frame_with_block(tmp_path, "a.pkl", _raw_object_array(flags=63)),
        "frombuffer-object": _frame_with_block(tmp_path, "b.pkl", frombuffer_object),
        "ndarray-called": _frame_with_block(tmp_path, "c.pkl", ndarray_called),
    }

    # A block placed on columns up to 1,000,000 of a six-column frame: pandas would write past its map.
    class _FarPlacement(pickle.Pickler):
        done = False

        def reducer_override(self, obj: Any) -> Any:
            if isinstance(obj, slice) and not self.done:
                _FarPlacement.done = True
                return (slice, (0, 1_000_000, 1))
            return NotImplemented

    payloads["placement"] = _dump(tmp_path / "d.pkl", make_sample(4, dimension=4), 5, _FarPlacement)
    assert _FarPlacement.done
    # A dtype state applied twice: the second would turn a checked dtype into another one.
    twice = pickle.dumps(_Rebuilt(), protocol=2)
    state = pickle.dumps((3, "|", None, None, None, -1, -1, 0), protocol=2)[2:-1]
    (tmp_path / "e.pkl").write_bytes(twice[:-1] + b"h\x0e" + state + b"b.")  # BINGET 14 (the dtype), BUILD
    payloads["state-twice"] = tmp_path / "e.pkl"
    results = dict(zip(payloads, _load_in_children(list(payloads.values())), strict=True))
    for name, (outcome, detail) in results.items():
        assert outcome == "REFUSED" and "refusing to load" in detail, (name, outcome, detail)
        assert not detail.startswith("MULTILINE"), (name, detail)


def _memo_gets(data: bytes) -> tuple[list[tuple[int, str]], int]:
    """Where the pickle fetches a memoized object, and how many objects it memoizes."""
    ops = list(pickletools.genops(data))
    gets = [(pos, op.name) for op, _, pos in ops if op.name in ("BINGET", "LONG_BINGET") and pos is not None]
    return gets, sum(op.name in ("MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT") for op, _, _ in ops)


def test_fuzzed_pickles_end_in_a_clean_refusal_or_a_clean_load(tmp_path: Path) -> None:
    """Byte damage (flips, inserts, deletes, truncation) and object confusion (a memo fetch
    pointed at another object, so that a state or an argument is of the wrong kind)."""
    rng = random.Random(FUZZ_SEED)
    bases = [pickle.dumps(rich_frame(), protocol=p) for p in (2, 5)]
    memo = [_memo_gets(b) for b in bases]
    paths = []
    for i in range(FUZZ_MUTATIONS):
        which = rng.randrange(len(bases))
        data = bytearray(bases[which])
        if rng.random() < 1 / 3:
            gets, memoized = memo[which]
            for _ in range(rng.choice((1, 2, 3))):
                pos, name = rng.choice(gets)
                if name == "BINGET":
                    data[pos + 1] = rng.randrange(min(memoized, 256))
                else:
                    data[pos + 1 : pos + 5] = rng.randrange(memoized).to_bytes(4, "little")
        else:
            for _ in range(rng.choice((1, 1, 2, 4, 8))):
                k, how = rng.randrange(len(data)), rng.random()
                if how < 0.5:
                    data[k] = rng.randrange(256)
                elif how < 0.65:
                    data[k] ^= 1 << rng.randrange(8)
                elif how < 0.8:
                    del data[k : k + rng.randrange(1, 8)]
                elif how < 0.9:
                    data[k:k] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 8)))
                else:
                    del data[k:]
        path = tmp_path / f"mutation-{i}.pkl"
        path.write_bytes(bytes(data))
        paths.append(path)
    results = _load_in_children(paths, timeout=600)
    unclean = [(i, r) for i, r in enumerate(results) if r[0] not in ("LOADED", "REFUSED") or "MULTILINE" in r[1]]
    assert not unclean, unclean[:10]
    outcomes = {kind for kind, _ in results}
    assert outcomes == {"LOADED", "REFUSED"}  # the mutations reach both ends
