"""``python -m tune_agb.search``: see :mod:`tune_agb.search.cli`."""

from tune_agb.errors import run_cli
from tune_agb.search.cli import main

if __name__ == "__main__":
    raise SystemExit(run_cli(main))
