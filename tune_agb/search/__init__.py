"""Hyperparameter search: Ray Tune + Optuna (TPE) + ASHA over a search-space file.

From Python, :func:`run` runs (or resumes) a search and returns a :class:`SearchOutcome` (the results table and the
best configuration); :func:`resolved_config` is the space a run would search. From the shell,
``python -m tune_agb.search`` (:mod:`tune_agb.search.cli`, a thin client of :func:`run`).

- ``api``: :func:`run`, :func:`resolved_config`, :class:`SearchOutcome`;
- ``space``: the search-space file grammar and its validation (no Ray);
- ``experiment``: the experiment folder ``STORAGE/NAME``, the one owner of its files and their format (no Ray);
- ``launch``: the searcher, scheduler, trainable, folds and Ray connection of a search;
- ``trainable``: the thin adapter between Tune and the engine's training loop;
- ``asha``: ASHA whose rungs survive an interruption; ``ray_internals``: the Ray internals it needs, in one place;
- ``state``: keeping Ray's experiment state resumable after a hard kill;
- ``results``: ``results.parquet``, ``best.yaml`` and the printed summary;
- ``cli``: the command line (``__main__``).

Importing this package imports neither Ray nor torch; its modules import Ray only where they need it.
"""

from tune_agb.search.api import SearchOutcome, resolved_config, run

__all__ = ["SearchOutcome", "resolved_config", "run"]
