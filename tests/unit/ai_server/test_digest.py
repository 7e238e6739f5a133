"""The AI server's range digests and listings over a loaded dataset (ai_server/digest.py)."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pandas as pd

from airflow_embedding_provider.ai_server.dataset import load_dataset
from airflow_embedding_provider.ai_server.digest import DatasetDigests, key_strings
from airflow_embedding_provider.digest import RangeDigest, row_hash
from dev.sample import make_sample


def test_digests_count_each_valid_id_once_with_its_last_copy(tmp_path: Path) -> None:
    frame = make_sample(300, dimension=8, seed=2)
    repeat = frame.iloc[[10]].assign(**{"Primary Keyword": "Rust"})  # the later copy wins
    odd = frame.iloc[[0]].assign(id=str(uuid.uuid4()))
    odd["job_post_vectors"] = pd.Series([np.ones(5, dtype=np.float32)], index=odd.index)
    bad_id = frame.iloc[[1]].assign(id="row-17")
    pd.concat([frame, repeat, odd, bad_id], ignore_index=True).to_pickle(tmp_path / "f.pkl")
    data = load_dataset(tmp_path / "f.pkl")
    digests = DatasetDigests(data)

    keys, hashes = digests.listing("", "")
    ids = key_strings(keys)
    assert len(ids) == 301 and ids == sorted(ids) and "row-17" not in ids  # 300 + the odd vector
    expected = {}
    for i in range(data.invalid_prefix, len(data)):
        vector = data.odd_vectors.get(i, data.vectors[i].astype("<f4").tobytes())
        expected[data.ids[i]] = row_hash(
            data.ids[i], data.company_name[i], data.exp_years[i], data.english_level[i], data.primary_keyword[i], vector
        )
    assert dict(zip(ids, hashes.tolist(), strict=True)) == expected
    assert digests.digest("", "") == RangeDigest.of(hashes)

    # Ranges split anywhere add up to the whole; bounds are (after, until].
    cut = ids[150]
    low, high = digests.digest("", cut), digests.digest(cut, "")
    assert low.rows == 151 and low.rows + high.rows == 301
    assert (low.digest + high.digest) % 2**64 == digests.digest("", "").digest


def test_selected_positions_hold_every_copy_and_the_rows_without_a_uuid(tmp_path: Path) -> None:
    frame = make_sample(50, dimension=4, seed=3)
    repeat = frame.iloc[[5]]
    pd.concat([frame, repeat, frame.iloc[[0]].assign(id="not-a-uuid")], ignore_index=True).to_pickle(tmp_path / "f.pkl")
    data = load_dataset(tmp_path / "f.pkl")
    digests = DatasetDigests(data)
    wanted = uuid.UUID(str(repeat["id"].iloc[0])).bytes
    from_start = digests.positions("", "", wanted).tolist()
    assert [data.ids[i] for i in from_start] == ["not-a-uuid", str(repeat["id"].iloc[0]), str(repeat["id"].iloc[0])]
    after_first = digests.positions(data.ids[data.invalid_prefix], "", wanted).tolist()
    assert len(after_first) == 2 and data.invalid_prefix not in after_first
