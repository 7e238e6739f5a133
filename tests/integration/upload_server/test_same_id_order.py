"""The upload path keeps the later copy of an id sent in two chunks (race forced, see
:mod:`tests.integration.same_id_gate`)."""

from __future__ import annotations

import threading

from airflow_embedding_provider.upload_server.client import upload
from airflow_embedding_provider.wire import embedding_pb2
from tests.integration.same_id_gate import NEWER, gate_held, install_gate, stored, two_chunks
from tests.integration.upload_server.conftest import StartServer


def test_upload_path_keeps_the_later_copy_of_an_id_sent_in_two_chunks(upload_server: StartServer, pg_dsn: str) -> None:
    server = upload_server("--db-connections", "2", "--sub-batch-size", "5")
    install_gate(pg_dsn)
    twice, chunks = two_chunks()
    results: list[embedding_pb2.UploadResult] = []
    with gate_held(pg_dsn, twice) as seen:
        sender = threading.Thread(target=lambda: results.append(upload(server.target, iter(chunks), timeout=60)))
        sender.start()
    sender.join(60)
    assert results and results[0].success, results
    assert stored(pg_dsn, twice) == (NEWER, 0.25), "the older copy overwrote the newer one"
    assert not seen["overtook"], "the newer copy was written before the older one had committed"
