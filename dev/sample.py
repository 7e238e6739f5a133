"""Generate a sample ``.pkl`` (or ``.parquet``): by default in the layout of the design's real
dataset, the Djinni job descriptions (string ``Exp Years`` with ``no_exp``, UUID4 ids, extra columns,
float32 numpy vectors); ``layout="seed"`` gives the six columns of docs/design.md §4.1 with UUIDv7 ids."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt
import pandas as pd

from airflow_embedding_provider.ai_server.dataset import PARQUET_BATCH_ROWS, PARQUET_SUFFIXES
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
#: ``Exp Years`` as Djinni writes it: a string, ``no_exp`` for "no experience required".
DJINNI_EXP_YEARS = ("no_exp", "1y", "2y", "3y", "5y")
#: The Djinni dataset's columns, in its order; ``job_post_vectors`` is what the AI team adds.
DJINNI_COLUMNS = (
    "Position",
    "Long Description",
    "Company Name",
    "Exp Years",
    "Primary Keyword",
    "English Level",
    "Published",
    "Long Description_lang",
    "id",
    "__index_level_0__",
    "job_post_vectors",
)
#: The deliberately odd cell of ``odd_cell=True``: an ``Exp Years`` no rule turns into years.
ODD_EXP_YEARS = "senior"
Layout = Literal["djinni", "seed"]
IdKind = Literal["uuid4", "uuid7"]


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


def uuid4_strings(count: int, rng: np.random.Generator) -> list[str]:
    """``count`` random (version 4) UUID strings, reproducible from ``rng``."""
    raw = rng.bytes(16 * count)
    return [str(uuid.UUID(bytes=raw[16 * i : 16 * i + 16], version=4)) for i in range(count)]


def clustered_vectors(
    rows: int,
    dimension: int,
    rng: np.random.Generator,
    *,
    clusters: int,
    topics: int = len(KEYWORDS),
    spread: float = 0.9,
    topic_spread: float = 1.0,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """Unit-norm vectors as text embeddings lie: ``topics`` broad areas, each holding fine
    neighbourhoods (``clusters`` in all, of uneven size) of rows; a neighbourhood's centre is its
    topic's centre plus noise of norm ``topic_spread``, a row its neighbourhood's centre plus noise
    of norm ``spread``. Returns the vectors and each row's topic. Uniform noise, where every row is
    about equally far from every other, makes every ANN index look bad."""

    def unit(a: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        return a / np.linalg.norm(a, axis=1, keepdims=True)

    def noise(count: int, norm: float) -> npt.NDArray[np.float32]:
        return rng.standard_normal((count, dimension)).astype(np.float32) * np.float32(norm / np.sqrt(dimension))

    topics = max(1, min(topics, clusters))
    topic_centres = unit(rng.standard_normal((topics, dimension)).astype(np.float32))
    topic_of = rng.integers(0, topics, size=clusters)
    centres = unit(topic_centres[topic_of] + noise(clusters, topic_spread))
    member = rng.choice(clusters, size=rows, p=rng.dirichlet(np.full(clusters, 2.0)))
    vectors = unit(centres[member] + noise(rows, spread))
    return vectors.astype(np.float32), topic_of[member].astype(np.int64)


def make_sample(
    rows: int,
    *,
    dimension: int = DEFAULT_DIMENSION,
    seed: int = 7,
    layout: Layout = "djinni",
    ids: IdKind | None = None,
    odd_cell: bool = False,
    clusters: int | None = None,
) -> pd.DataFrame:
    """A DataFrame of ``rows`` rows with unit-norm vectors, in shuffled (not id) order.

    :param layout: ``djinni`` (the real dataset's columns) or ``seed`` (docs/design.md §4.1's six, int years).
    :param ids: ``uuid4`` (Djinni's) or ``uuid7`` (time-ordered); default by layout.
    :param odd_cell: one row's ``Exp Years`` is :data:`ODD_EXP_YEARS`: that row goes to the DLQ.
    :param clusters: draw the vectors from this many neighbourhoods (:func:`clustered_vectors`)
        instead of uniformly on the sphere; a row's primary keyword is then its topic's (one
        topic a keyword) four times in five, as a job post's text is about its keyword.
    """
    if rows < 1 or dimension < 1:
        raise ValueError("rows and dimension must be at least 1")
    rng = np.random.default_rng(seed)
    kind = ids or ("uuid4" if layout == "djinni" else "uuid7")
    row_ids = uuid7_strings(rows, rng) if kind == "uuid7" else uuid4_strings(rows, rng)
    topic = None
    if clusters:
        vectors, topic = clustered_vectors(rows, dimension, rng, clusters=clusters)
    else:
        vectors = rng.standard_normal((rows, dimension), dtype=np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    order = rng.permutation(rows)  # the server must order by id itself
    keywords = rng.choice(np.array(KEYWORDS, dtype=object), size=rows)
    frame = pd.DataFrame(
        {
            "id": [row_ids[i] for i in order],
            "Company Name": rng.choice(np.array(COMPANIES, dtype=object), size=rows),
            "Exp Years": rng.integers(0, 16, size=rows).astype(np.int64),
            "English Level": rng.choice(np.array(ENGLISH_LEVELS, dtype=object), size=rows),
            "Primary Keyword": keywords,
            "job_post_vectors": list(vectors[order]),
        }
    )
    if topic is not None:
        on_topic = rng.random(rows) < 0.8
        topical = np.array(KEYWORDS, dtype=object)[topic[order] % len(KEYWORDS)]
        frame["Primary Keyword"] = np.where(on_topic, topical, frame["Primary Keyword"].to_numpy())
    if layout == "djinni":
        levels = ("Junior", "Middle", "Senior", "Lead")
        frame["Exp Years"] = rng.choice(np.array(DJINNI_EXP_YEARS, dtype=object), size=rows)
        frame["Position"] = [f"{levels[n % 4]} {k} Developer" for n, k in enumerate(keywords)]
        frame["Long Description"] = [
            f"We are looking for a {k} engineer to join our team. Remote work, flexible hours." for k in keywords
        ]
        published = pd.Timestamp("2021-01-01") + pd.to_timedelta(rng.integers(0, 3 * 365 * 86400, size=rows), "s")
        frame["Published"] = published
        frame["Long Description_lang"] = "en"
        frame["__index_level_0__"] = rng.permutation(rows * 2)[:rows].astype(np.int64)
        frame = frame[list(DJINNI_COLUMNS)]
    else:
        frame = frame[list(PKL_COLUMNS)]
    if odd_cell:
        frame["Exp Years"] = frame["Exp Years"].astype(object)
        frame.loc[rows // 3, "Exp Years"] = ODD_EXP_YEARS
    return frame


def write_sample(
    path: str | Path,
    rows: int,
    *,
    dimension: int = DEFAULT_DIMENSION,
    seed: int = 7,
    layout: Layout = "djinni",
    ids: IdKind | None = None,
    odd_cell: bool = False,
    clusters: int | None = None,
) -> Path:
    """Write :func:`make_sample` to ``path``: Parquet when it ends in ``.parquet``/``.pq``, else a pickle."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frame = make_sample(
        rows, dimension=dimension, seed=seed, layout=layout, ids=ids, odd_cell=odd_cell, clusters=clusters
    )
    if path.suffix.lower() in PARQUET_SUFFIXES:
        # Row groups of a batch each, so that a reader can stream them (docs/design.md §2: memory-efficient).
        frame.to_parquet(path, index=False, row_group_size=PARQUET_BATCH_ROWS)
    else:
        frame.to_pickle(path)
    return path
