"""``python -m backfill``: the same command line as the ``backfill`` script."""

from __future__ import annotations

import sys

from backfill.cli import main

if __name__ == "__main__":
    sys.exit(main())
