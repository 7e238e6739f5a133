"""``python -m dev ...``: see :mod:`dev.cli`."""

import sys

from dev.cli import main

sys.exit(main())
