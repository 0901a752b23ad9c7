"""Hyperparameter search: Ray Tune + Optuna (TPE) + ASHA over a search-space file (``python -m tune_agb.search``).

- ``space``: the search-space file grammar and its validation (no Ray);
- ``experiment``: the experiment folder ``STORAGE/NAME``, the one owner of its files and their format (no Ray);
- ``trainable``: the thin adapter between Tune and the engine's training loop;
- ``asha``: ASHA whose rungs survive an interruption; ``ray_internals``: the Ray internals it needs, in one place;
- ``state``: keeping Ray's experiment state resumable after a hard kill;
- ``results``: ``results.parquet``, ``best.yaml`` and the printed summary;
- ``cli``: the command line (``__main__``).

Importing this package imports neither Ray nor torch; its modules import Ray only where they need it.
"""
