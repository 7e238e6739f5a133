"""Writes this folder's pickles under the pandas/numpy of the interpreter that runs it:

    python tests/unit/ai_server/pickles/make.py   (in a venv with, e.g., pandas 2.3.3 + numpy 1.26.4)

The files kept here: pandas 2.3.3 + numpy 1.26.4 (+ pytz, pyarrow 15) and pandas 3.0.6 +
numpy 2.2.6 (+ pyarrow), each at the default protocol and gzipped at protocol 2.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from frames import rich_frame  # noqa: E402


def main() -> None:
    frame = rich_frame()
    # pandas 3 cannot unpickle the NaT cells that pandas 2 writes (pandas renamed the function
    # that rebuilds them), with or without our loader: leave them out of the files.
    frame = frame.drop(columns=["seen", "seen_tz"])
    frame["mixed"] = frame["mixed"].map(lambda v: None if v is pd.NaT else v)
    tag = f"pandas{pd.__version__}-numpy{np.__version__}"
    frame.to_pickle(HERE / f"{tag}.pkl")
    frame.to_pickle(HERE / f"{tag}-protocol2.pkl.gz", protocol=2)


if __name__ == "__main__":
    main()
