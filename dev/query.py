"""``make query SQL=...``: run one statement against the demo's embedded database and print it."""

from __future__ import annotations

import argparse
import sys

import psycopg

from dev.embedded_postgres import EmbeddedPostgres
from dev.stack import REPO_ROOT


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("sql")
    parser.add_argument("--dsn", default="", help="query this database instead of the demo's embedded one")
    args = parser.parse_args(argv)
    if not args.sql.strip():
        parser.error('give a statement: make query SQL="SELECT count(*) FROM recruit_metadata"')
    data_dir = REPO_ROOT / ".demo" / "pgdata"
    if not args.dsn and not (data_dir / "PG_VERSION").exists():
        print("no demo database yet: run `make demo` first", file=sys.stderr)
        return 1
    server = None if args.dsn else EmbeddedPostgres(data_dir).start()
    try:
        dsn = args.dsn or server.dsn("recruit_demo")  # type: ignore[union-attr]
        with psycopg.connect(dsn) as conn, conn.cursor() as cur:
            try:
                cur.execute(args.sql)
            except psycopg.Error as exc:
                print(f"error: {exc}".strip(), file=sys.stderr)
                return 1
            if cur.description is None:
                print(cur.statusmessage)
                return 0
            print(" | ".join(c.name for c in cur.description))
            for row in cur.fetchall():
                print(" | ".join("NULL" if v is None else str(v)[:80] for v in row))
    finally:
        if server is not None:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
