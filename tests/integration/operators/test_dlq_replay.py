"""``EmbeddingDlqReplayOperator``: its templated scope, rendered and checked (the replay itself:
tests/integration/test_replay.py)."""

from __future__ import annotations

import pytest

from airflow_embedding_provider.operators.dlq_replay import EmbeddingDlqReplayOperator
from airflow_embedding_provider.storage.dlq import DlqScope
from tests.integration.test_replay import _uid


def test_operator_params_are_parsed_and_checked() -> None:
    op = EmbeddingDlqReplayOperator(
        task_id="replay",
        ids='["' + _uid(1).upper() + '"]',
        since="2025-12-11T10:00:00",
        until="2025-12-12T00:00:00+02:00",
        error_kinds="dimension_mismatch, non_finite_vector",
    )
    scope = op.scope()
    assert scope.ids == (_uid(1),)
    assert scope.since is not None and scope.since.isoformat() == "2025-12-11T10:00:00+00:00"
    assert scope.until is not None and scope.until.utcoffset() is not None
    assert scope.error_kinds == ("dimension_mismatch", "non_finite_vector")
    assert EmbeddingDlqReplayOperator(task_id="r", ids="[]", error_kinds="", since="None").scope() == DlqScope()
    with pytest.raises(ValueError, match="not a UUID"):
        EmbeddingDlqReplayOperator(task_id="r", ids=["yesterday"]).scope()
    with pytest.raises(ValueError, match="must be before until"):
        EmbeddingDlqReplayOperator(task_id="r", since="2025-12-12", until="2025-12-11").scope()
    with pytest.raises(ValueError, match="ISO 8601"):
        EmbeddingDlqReplayOperator(task_id="r", since="last week").scope()
