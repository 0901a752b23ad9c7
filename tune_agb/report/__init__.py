"""An HTML report of a search or of a final training: one self-contained page (images embedded, no scripts) written
to ``FOLDER/report/index.html``, which opens offline.

    python -m tune_agb.report FOLDER [--unit Mg/ha]

``FOLDER`` is a search's experiment folder ``STORAGE/NAME`` (``results.parquet`` and ``search.yaml``, with
``best.yaml`` and ``cv_folds.json`` where written; :mod:`tune_agb.report.search_page`) or a final run's folder
(``metrics.json`` and ``predictions.parquet``, with ``test_maps.npz`` where written;
:mod:`tune_agb.report.final_page`): a local folder or a URI (``file://``, ``s3://``, ``gs://``). Every file is
read through :mod:`tune_agb.runs`, and the page is written back to the same location.
"""

from __future__ import annotations

import sys
from pathlib import Path

from tune_agb.errors import TuneAgbError
from tune_agb.location import FILE_SCHEME, check_bucket, exists, is_uri, join, write_atomic
from tune_agb.runs import METRICS_FILE, PREDICTIONS_FILE, RESULTS_FILE, SEARCH_FILE

REPORT_DIR = "report"
INDEX = "index.html"

__all__ = ["INDEX", "REPORT_DIR", "build_page", "write_report", "write_report_or_warn"]


def build_page(folder: str | Path, unit: str = "") -> str:
    """The HTML page of a search's experiment folder or of a final run's folder, whichever ``folder`` is.

    Args:
        folder: a local folder or a URI (``file://``, ``s3://``, ``gs://``); the page names it as given.
        unit: the unit of the labels for axis titles (e.g. ``"Mg/ha"``; ``""``: none shown); a final run's only.

    Returns:
        The page, a complete HTML document.

    Raises:
        TuneAgbError: when ``folder`` is neither kind of folder, or one of its files is malformed (one line naming
            the file).
    """
    from tune_agb.report.final_page import final_page  # matplotlib and torch only once a page is drawn
    from tune_agb.report.search_page import search_page

    where = str(folder).rstrip("/") or str(folder)
    check_bucket(where)  # a wrong bucket or credentials: said as such, not as a folder of the wrong kind
    if exists(join(where, RESULTS_FILE)) and exists(join(where, SEARCH_FILE)):
        return search_page(where)
    if exists(join(where, METRICS_FILE)) and exists(join(where, PREDICTIONS_FILE)):
        return final_page(where, unit)
    raise TuneAgbError(
        f"{where}: neither a search's experiment folder ({RESULTS_FILE} + {SEARCH_FILE}) "
        f"nor a final run's folder ({METRICS_FILE} + {PREDICTIONS_FILE})"
    )


def write_report(folder: str | Path, unit: str = "") -> Path | str:
    """Write ``FOLDER/report/index.html``: the page of :func:`build_page`, written atomically.

    Args:
        folder: a search's experiment folder ``STORAGE/NAME`` or a final run's folder: a local folder, or a URI
            (``file://``, ``s3://``, ``gs://``) read and written through pyarrow's filesystem.
        unit: the unit of the labels for axis titles (e.g. ``"Mg/ha"``; ``""``: none shown).

    Returns:
        The page's path for a local folder; its URI for a URI (``file://`` included).

    Raises:
        TuneAgbError: when ``folder`` is neither kind of folder, or its files cannot be read, or the page cannot be
            written (one line naming the file).
    """
    text = build_page(folder, unit)
    where = str(folder).rstrip("/") or str(folder)
    out = join(where, REPORT_DIR, INDEX)
    write_atomic(out, text.encode("utf-8"))
    return out if is_uri(where) or where.startswith(FILE_SCHEME) else Path(folder) / REPORT_DIR / INDEX


def write_report_or_warn(folder: str | Path, unit: str = "") -> Path | str | None:
    """:func:`write_report` at the end of a search or a final training: what they wrote is kept whatever happens
    here, so a page that cannot be drawn is one warning line on stderr (and None), never a failed run."""
    try:
        return write_report(folder, unit)
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"warning: {folder}: report page not written ({first})", file=sys.stderr)
        return None
