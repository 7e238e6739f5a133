"""Row hashes and range digests (digest.py): one definition, order-independent digests."""

from __future__ import annotations

import numpy as np

from airflow_embedding_provider.digest import RangeDigest, pack_hashes, row_hash, row_hashes, unpack_hashes

ID = "019b0ab5-2505-70b1-a1e9-c32b7590e4ea"


def test_the_row_hash_is_pinned_so_that_another_implementation_can_check_itself() -> None:
    vector = np.arange(4, dtype="<f4").tobytes()
    assert row_hash(ID, "Acme", 3, None, "Python", vector) == -4332381727696386896


def test_every_field_and_every_vector_bit_changes_the_hash() -> None:
    vector = np.arange(4, dtype="<f4")
    base = (ID, "Acme", 3, "upper", "Python")
    h = row_hash(*base, vector.tobytes())
    flipped = vector.copy()
    flipped.view(np.uint32)[2] ^= 1
    variants = [
        (ID.replace("e", "f"), "Acme", 3, "upper", "Python", vector.tobytes()),
        (ID, "Acme ", 3, "upper", "Python", vector.tobytes()),
        (ID, None, 3, "upper", "Python", vector.tobytes()),
        (ID, "", 3, "upper", "Python", vector.tobytes()),
        (ID, "Acme", None, "upper", "Python", vector.tobytes()),
        (ID, "Acme", 0, "upper", "Python", vector.tobytes()),
        (ID, "Acme", 3, "Python", "upper", vector.tobytes()),  # fields do not run into each other
        (ID, "Acme", 3, "upper", "Python", flipped.tobytes()),
        (ID, "Acme", 3, "upper", "Python", vector.tobytes()[:-4]),
    ]
    hashes = {row_hash(*v) for v in variants}
    assert h not in hashes and len(hashes) == len(variants)


def test_the_columnar_form_matches_row_by_row() -> None:
    rng = np.random.default_rng(3)
    n = 50
    ids = [f"019b0ab5-2505-70b1-a1e9-{i:012x}" for i in range(n)]
    company = [None if i % 7 == 0 else f"Company {i % 3}" for i in range(n)]
    years = [None if i % 5 == 0 else i % 9 for i in range(n)]
    english = ["upper"] * n
    keyword = [None] * n
    vectors = rng.standard_normal((n, 8)).astype(np.float32)
    columnar = row_hashes(ids, company, years, english, keyword, vectors)
    single = [row_hash(ids[i], company[i], years[i], english[i], keyword[i], vectors[i].tobytes()) for i in range(n)]
    assert columnar.tolist() == single
    assert unpack_hashes(pack_hashes(columnar)).tolist() == single


def test_a_digest_does_not_depend_on_the_order_and_sql_sums_give_the_same() -> None:
    hashes = np.random.default_rng(5).integers(-(2**63), 2**63 - 1, size=1000, dtype=np.int64)
    digest = RangeDigest.of(hashes)
    assert RangeDigest.of(hashes[::-1].copy()) == digest
    assert RangeDigest.from_sum(len(hashes), sum(int(h) for h in hashes)) == digest  # SQL's unbounded sum
    assert RangeDigest.of(hashes[1:]) != digest
    assert RangeDigest.of(np.empty(0, dtype=np.int64)) == RangeDigest(0, 0)
