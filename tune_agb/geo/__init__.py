"""Geospatial side: ``raster`` (GeoTIFF stacks read through rasterio, map points onto a grid, staged writes, the
shared input-stack flags), ``remote`` (rasters and tables on S3 or http(s): GDAL's S3 settings from
``AWS_ENDPOINT_URL``, one-line errors) and ``tiling`` (numpy only: window starts, the block split into
train/val/test, point labels averaged per pixel), shared by ``prepare``, ``predict`` and the demo. It imports neither
Ray nor torch."""
