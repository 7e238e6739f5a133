"""Generate a sample ``.pkl`` (or ``.parquet``) in the design's layout (SEED.md 4.1) with UUIDv7 ids."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from airflow_embedding_provider.ai_server.dataset import PARQUET_BATCH_ROWS, PARQUET_SUFFIXES
from airflow_embedding_provider.rows import DEFAULT_DIMENSION, PKL_COLUMNS

ENGLISH_LEVELS = ("no_english", "basic", "pre", "intermediate", "upper", "fluent")
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


def make_sample(rows: int, *, dimension: int = DEFAULT_DIMENSION, seed: int = 7) -> pd.DataFrame:
    """A DataFrame of ``rows`` rows with unit-norm vectors, in shuffled (not id) order."""
    if rows < 1 or dimension < 1:
        raise ValueError("rows and dimension must be at least 1")
    rng = np.random.default_rng(seed)
    ids = uuid7_strings(rows, rng)
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


def write_sample(path: str | Path, rows: int, *, dimension: int = DEFAULT_DIMENSION, seed: int = 7) -> Path:
    """Write the sample to ``path``: Parquet when it ends in ``.parquet``/``.pq``, else a pickle."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frame = make_sample(rows, dimension=dimension, seed=seed)
    if path.suffix.lower() in PARQUET_SUFFIXES:
        # Row groups of a batch each, so that a reader can stream them (SEED.md 2: memory-efficient).
        frame.to_parquet(path, index=False, row_group_size=PARQUET_BATCH_ROWS)
    else:
        frame.to_pickle(path)
    return path
