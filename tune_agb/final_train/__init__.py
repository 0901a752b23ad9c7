"""Final training: retrain a configuration (given, or the best of a search), evaluate it on the test split, and
write the model(s), metrics, per-pixel predictions, maps, plots, TensorBoard logs and a report page.

    >>> import tune_agb.final_train as final_train
    >>> outcome = final_train.run(experiment="ray_results/demo", out_dir="runs/demo-final")
    >>> outcome.metrics["test_rmse"]

:func:`run` is the API (``python -m tune_agb.final_train`` is a thin client of it, :mod:`tune_agb.final_train.cli`)
and :func:`resolved_config` what ``--print-config`` prints. Precedence of the config: built-in defaults < the
experiment's best config < the ``config`` file < ``epochs``/``seed`` < ``overrides`` (``config.KEY``/``final.KEY``).

Ensembles: ``ensemble=N`` trains one configuration with N seeds; ``ensemble_top=K`` (with ``experiment``) trains the
K best distinct configurations of the search, each with its own config. Either way members go to
``OUT/members/member_KK/``, ``OUT/ensemble.yaml`` says where each came from, and the ensemble predicts the mixture of
the members, each weighted at each pixel by its precision, bounded
(:func:`tune_agb.engine.inference.combine_members`). With ``experiment``, the ``final`` section of the search's space
(its recipe: ``ensemble_top``, ``ensemble``, ``cv_final``, ``calibration``) gives those options' defaults; arguments
that are not None and ``final.KEY`` overrides win over it.

After training, the predicted variance is recalibrated on the validation split (:mod:`tune_agb.engine.calibration`,
saved as ``OUT/calibration.json``); predictions, maps, plots and the ``val_*``/``test_*`` metrics are calibrated,
and ``metrics.json["uncalibrated"]`` holds the metrics before.

Modules: :mod:`~tune_agb.final_train.plan` (options, members, validation), :mod:`~tune_agb.final_train.training`
(one member, epoch callbacks), :mod:`~tune_agb.final_train.ensemble` (the maths), :mod:`~tune_agb.final_train.outputs`
(plots, ensemble.yaml, summary tables), :mod:`~tune_agb.final_train.api`, :mod:`~tune_agb.final_train.cli`.
"""

from tune_agb.final_train.api import FinalOutcome, resolved_config, run

__all__ = ["FinalOutcome", "resolved_config", "run"]
