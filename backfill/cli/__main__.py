"""``python -m backfill.cli``: the console script, run as a module (the tests run it so)."""

from __future__ import annotations

import sys

from backfill.cli import main

sys.exit(main())
