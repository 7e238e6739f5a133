"""``EmbeddingAssetEventOperator``: announce a change of the embedding table as an Asset event.

Airflow emits an event for every outlet of a task that succeeds, so the "only when rows changed"
rule is this task's: it skips (no event, no downstream run) when the upstream task changed no row,
and otherwise sets the event's extra to ``{"rows_changed": ..., "checkpoint": ...}``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from airflow.sdk import Asset, BaseOperator
from airflow.sdk.exceptions import AirflowSkipException

from airflow_embedding_provider.assets import change_extra, embedding_table_asset

if TYPE_CHECKING:
    from airflow.sdk import Context


class EmbeddingAssetEventOperator(BaseOperator):
    """Emits one event of ``asset`` when ``source_task_id``'s result changed rows; skips otherwise.

    :param source_task_id: the task whose result (XCom) counts ``inserted``, ``updated`` and
        optionally ``deleted`` rows, and names the ``last_processed_uuid`` reached.
    :param asset: the Asset to emit; the embedding table's (see :func:`embedding_table_asset`) by default.
    """

    template_fields: Sequence[str] = ("source_task_id",)
    ui_color = "#e8f8f5"

    def __init__(self, *, source_task_id: str, asset: Asset | None = None, **kwargs: Any) -> None:
        self.asset = asset or embedding_table_asset()
        kwargs.setdefault("outlets", [self.asset])
        super().__init__(**kwargs)
        self.source_task_id = source_task_id

    def execute(self, context: Context) -> dict[str, Any]:
        result = context["ti"].xcom_pull(task_ids=self.source_task_id)
        extra = change_extra(result if isinstance(result, dict) else None)
        if extra is None:
            raise AirflowSkipException(f"{self.source_task_id} changed no rows: no event of {self.asset.uri}")
        context["outlet_events"][self.asset].extra = extra
        self.log.info("asset event of %s: %s", self.asset.uri, extra)
        return extra
