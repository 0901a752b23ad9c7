"""Geospatial I/O: raster stacks read through rasterio, and the tiling helpers that ``prepare``, ``predict`` and
the demo scene share. It imports neither Ray nor torch."""
