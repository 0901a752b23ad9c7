"""tune_agb: hyperparameter search and final training for sparse-label biomass / canopy-height U-Nets."""

__version__ = "0.1.0"
