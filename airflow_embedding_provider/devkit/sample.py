"""Generate a sample ``.pkl`` in the design's layout (SEED.md 4.1) with UUIDv7 ids."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import pandas as pd

from airflow_embedding_provider.rows import DEFAULT_DIMENSION, ENGLISH_LEVELS, PKL_COLUMNS

__all__ = ["ENGLISH_LEVELS", "clustered_vectors", "make_sample", "uuid7_strings", "write_sample"]
KEYWORDS = (
    "Python",
    "Java",
    "JavaScript",
    ".NET",
    "QA",
    "Go",
    "PHP",
    "iOS",
    "Android",
    "DevOps",
    "Data Science",
    "C++",
    "Ruby",
    "Scala",
    "Node.js",
    "React",
    "SQL",
    "Rust",
)
COMPANIES = (
    "SoftServe",
    "EPAM",
    "GlobalLogic",
    "Grammarly",
    "MacPaw",
    "Ajax Systems",
    "Preply",
    "Müller & Söhne GmbH",
    "Żabka Tech",
    "Nová Data s.r.o.",
    "Приватбанк",
    "Монобанк",
    "東京ソフトウェア株式会社",
    "서울데이터",
    "Café Código",
    "Ørsted Digital",
    "İstanbul Yazılım",
    "Łódź Labs",
    "Ελληνική Πληροφορική",
    "Zürich Analytics AG",
)
EPOCH_MS = 1_765_411_200_000  # 2025-12-11, the design's date


def uuid7_strings(count: int, rng: np.random.Generator, start_ms: int = EPOCH_MS) -> list[str]:
    """``count`` distinct UUIDv7 strings, time-ordered by creation (RFC 9562 layout)."""
    ms = start_ms + np.cumsum(rng.integers(0, 3, size=count, dtype=np.uint64))
    rand = rng.integers(0, 2**62, size=(count, 2), dtype=np.uint64)
    hi = (ms << np.uint64(16)) | np.uint64(0x7000) | (rand[:, 0] & np.uint64(0x0FFF))
    lo = np.uint64(0x8000000000000000) | (rand[:, 1] & np.uint64(0x3FFFFFFFFFFFFFFF))
    raw = np.stack([hi, lo], axis=1).astype(">u8").tobytes()
    out = []
    for i in range(count):
        h = raw[16 * i : 16 * i + 16].hex()
        out.append(f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}")
    return out


def clustered_vectors(
    rows: int, dimension: int, rng: np.random.Generator, *, clusters: int, spread: float = 1.0
) -> npt.NDArray[np.float32]:
    """Unit-norm vectors in ``clusters`` neighbourhoods of uneven size, as text embeddings have
    (topics): each row is its cluster's centre plus noise of norm about ``spread``. Uniform noise,
    where every row is about equally far from every other, makes every ANN index look bad."""
    centres = rng.standard_normal((clusters, dimension)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    sizes = rng.dirichlet(np.full(clusters, 2.0))
    member = rng.choice(clusters, size=rows, p=sizes)
    noise = rng.standard_normal((rows, dimension)).astype(np.float32) * np.float32(spread / np.sqrt(dimension))
    vectors = centres[member] + noise
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors.astype(np.float32)


def make_sample(
    rows: int, *, dimension: int = DEFAULT_DIMENSION, seed: int = 7, clusters: int | None = None
) -> pd.DataFrame:
    """A DataFrame of ``rows`` rows with unit-norm vectors, in shuffled (not id) order.

    :param clusters: draw the vectors from this many neighbourhoods (:func:`clustered_vectors`)
        instead of uniformly on the sphere.
    """
    if rows < 1 or dimension < 1:
        raise ValueError("rows and dimension must be at least 1")
    rng = np.random.default_rng(seed)
    ids = uuid7_strings(rows, rng)
    if clusters:
        vectors = clustered_vectors(rows, dimension, rng, clusters=clusters)
    else:
        vectors = rng.standard_normal((rows, dimension), dtype=np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    order = rng.permutation(rows)  # the server must order by id itself
    frame = pd.DataFrame(
        {
            "id": [ids[i] for i in order],
            "Company Name": rng.choice(np.array(COMPANIES, dtype=object), size=rows),
            "Exp Years": rng.integers(0, 16, size=rows).astype(np.int64),
            "English Level": rng.choice(np.array(ENGLISH_LEVELS, dtype=object), size=rows),
            "Primary Keyword": rng.choice(np.array(KEYWORDS, dtype=object), size=rows),
            "job_post_vectors": list(vectors[order]),
        }
    )
    return frame[list(PKL_COLUMNS)]


def write_sample(
    path: str | Path, rows: int, *, dimension: int = DEFAULT_DIMENSION, seed: int = 7, clusters: int | None = None
) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    make_sample(rows, dimension=dimension, seed=seed, clusters=clusters).to_pickle(path)
    return path
