"""Geospatial side: ``raster`` (GeoTIFF stacks read through rasterio, map points onto a grid, staged writes, the
shared input-stack flags) and ``tiling`` (numpy only: window starts, the block split into train/val/test, point
labels averaged per pixel), shared by ``prepare``, ``predict`` and the demo. It imports neither Ray nor torch."""
