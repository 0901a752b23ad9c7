"""The training engine: configuration, data, U-Net, losses, metrics, checkpoints, the training loop and inference.

It depends on torch and numpy only: it imports neither Ray nor rasterio (a test enforces it), so the same code
serves the search (``tune_agb.search``), final training, the baseline and wall-to-wall prediction.
"""
