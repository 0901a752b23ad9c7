"""``python -m tune_agb.report``: see :mod:`tune_agb.report.cli`."""

from tune_agb.errors import run_cli
from tune_agb.report.cli import main

raise SystemExit(run_cli(main))
