"""``python -m tune_agb.final_train``: the command of :mod:`tune_agb.final_train.cli`."""

from tune_agb.errors import run_cli
from tune_agb.final_train.cli import main

if __name__ == "__main__":
    raise SystemExit(run_cli(main))
