"""The command ``python -m tune_agb.report FOLDER [--unit U]``: writes the report page of a search's experiment
folder or of a final run's folder (:func:`tune_agb.report.write_report`) and prints where."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

from tune_agb.report import write_report


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, write the page, print its path or URI; 0 on success (errors raise, :func:`run_cli` maps them
    to one line and exit code 2)."""
    p = argparse.ArgumentParser(
        prog="python -m tune_agb.report",
        description="An HTML report of a search or of a final training, one self-contained page.",
    )
    p.add_argument("path", help="experiment folder STORAGE/NAME or final run's folder (a path, s3://, gs://, file://)")
    p.add_argument("--unit", default="", help="unit of the labels for axis titles, e.g. Mg/ha")
    args = p.parse_args(argv)
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    print(write_report(args.path, args.unit))
    return 0
