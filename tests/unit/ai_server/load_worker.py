"""Loads each file named on the command line with ``load_dataset`` and prints one line a file.

Run by the tests in a child process, so that a file that crashes the interpreter (SIGSEGV) is
seen by the test as a failed load of that file instead of killing pytest:

    START <n>                  before file n
    LOADED <n> <rows>          a clean load
    REFUSED <n> <message>      DatasetError, one line
    ERROR <n> <type>: <text>   anything else (a traceback the user would see)
"""

from __future__ import annotations

import sys
import warnings

from airflow_embedding_provider.ai_server.dataset import DatasetError, load_dataset


def main(paths: list[str]) -> int:
    warnings.simplefilter("ignore")
    for n, path in enumerate(paths):
        print(f"START {n}", flush=True)
        try:
            rows = len(load_dataset(path))
        except DatasetError as exc:
            message = str(exc)
            print(f"REFUSED {n} {message if chr(10) not in message else 'MULTILINE ' + repr(message)}", flush=True)
        except BaseException as exc:  # reported to the test, which fails on it
            print(f"ERROR {n} {type(exc).__name__}: {str(exc)[:300]!r}", flush=True)
        else:
            print(f"LOADED {n} {rows}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
