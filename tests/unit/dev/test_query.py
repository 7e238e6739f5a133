"""``make query`` refuses an empty statement with its usage instead of printing ``None``."""

from __future__ import annotations

import pytest

from dev.query import main


@pytest.mark.parametrize("statement", ["", "  "])
def test_an_empty_statement_is_refused_with_the_usage(statement: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main([statement, "--dsn", "postgresql://nobody@127.0.0.1:1/none"])
    assert exited.value.code == 2
    assert 'give a statement: make query SQL="SELECT count(*) FROM recruit_metadata"' in capsys.readouterr().err
