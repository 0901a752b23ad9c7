"""The files of a multi-scene map: the staged block GeoTIFFs, each scene's COG (assembled from its blocks through a
GDAL VRT, so no scene is ever held in memory), and one mosaic per CRS (a GDAL VRT over the scenes' COGs).

The VRTs are written here as XML (GDAL's Python bindings are not a dependency): a VRT is a small text file GDAL
(and QGIS, rasterio, ...) opens as one raster. In a mosaic each scene appears twice: whole, then on top without the
``margin`` px along its edges that face another scene, so that where scenes overlap by more than twice the margin
every pixel comes from a scene that saw all the context around it, and overlapping scenes join without seams.
"""

from __future__ import annotations

import os
import tempfile
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
import rasterio.shutil
from affine import Affine
from rasterio.crs import CRS
from rasterio.errors import NotGeoreferencedWarning
from rasterio.windows import Window

from tune_agb.errors import TuneAgbError
from tune_agb.maps.plan import PARTIAL
from tune_agb.predict import COG_OPTIONS, OUTPUT_BANDS

Rect = tuple[int, int, int, int]  # x offset, y offset, width, height (px)


@dataclass(frozen=True)
class SceneGrid:
    """Where a scene's map lies: its size, CRS and transform."""

    height: int
    width: int
    crs: CRS
    transform: Affine


@dataclass(frozen=True)
class Source:
    """A rectangle of a raster file placed in a VRT."""

    path: Path
    src: Rect
    dst: Rect
    size: tuple[int, int]  # the source file's width, height


def write_block(path: Path, data: np.ndarray, grid: SceneGrid, window: Window) -> None:
    """Write a block's (2, h, w) float32 map as a small georeferenced GeoTIFF, atomically (temporary name, renamed)."""
    tmp = path.with_name(path.name + PARTIAL)
    profile = {
        "driver": "GTiff",
        "dtype": "float32",
        "count": data.shape[0],
        "height": data.shape[1],
        "width": data.shape[2],
        "crs": grid.crs,
        "transform": grid.transform @ Affine.translation(window.col_off, window.row_off),
        "nodata": float("nan"),
    }
    with rasterio.open(tmp, "w", **profile) as dst:
        dst.write(data)
    os.replace(tmp, path)


def vrt_xml(
    width: int,
    height: int,
    crs: CRS,
    transform: Affine,
    sources: Sequence[Source],
    vrt_dir: Path,
    tags: dict[str, str] | None = None,
) -> str:
    """A 2-band float32 GDAL VRT (bands ``mean``, ``std``; nodata NaN) of ``sources``, later ones on top.

    Source files under ``vrt_dir`` are named relative to it (the VRT can move with them).
    """
    root = ET.Element("VRTDataset", rasterXSize=str(width), rasterYSize=str(height))
    ET.SubElement(root, "SRS").text = crs.to_wkt()
    ET.SubElement(root, "GeoTransform").text = ", ".join(repr(float(v)) for v in transform.to_gdal())
    if tags:
        md = ET.SubElement(root, "Metadata")
        for k, v in tags.items():
            ET.SubElement(md, "MDI", key=k).text = v
    for b, name in enumerate(OUTPUT_BANDS, start=1):
        band = ET.SubElement(root, "VRTRasterBand", dataType="Float32", band=str(b))
        ET.SubElement(band, "Description").text = name
        ET.SubElement(band, "NoDataValue").text = "nan"
        for s in sources:
            src = ET.SubElement(band, "ComplexSource")
            try:
                name_, rel = str(s.path.relative_to(vrt_dir)), "1"
            except ValueError:
                name_, rel = str(s.path), "0"
            ET.SubElement(src, "SourceFilename", relativeToVRT=rel).text = name_
            ET.SubElement(src, "SourceBand").text = str(b)
            ET.SubElement(
                src,
                "SourceProperties",
                RasterXSize=str(s.size[0]),
                RasterYSize=str(s.size[1]),
                DataType="Float32",
            )
            for tag, (x, y, w, h) in (("SrcRect", s.src), ("DstRect", s.dst)):
                ET.SubElement(src, tag, xOff=str(x), yOff=str(y), xSize=str(w), ySize=str(h))
            ET.SubElement(src, "NODATA").text = "nan"
    ET.indent(root)
    return ET.tostring(root, encoding="unicode") + "\n"


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + PARTIAL)
    tmp.write_text(text)
    os.replace(tmp, path)


def scene_cog(
    out: Path, grid: SceneGrid, blocks: Sequence[tuple[Path, Window]], tags: dict[str, str], staging: Path
) -> None:
    """Assemble a scene's COG from its staged blocks: a VRT of the blocks copied by GDAL's COG driver (windowed, so
    memory does not grow with the scene) to a temporary file next to ``out``, renamed onto ``out`` when complete."""
    sources = [
        Source(
            p,
            (0, 0, int(w.width), int(w.height)),
            (int(w.col_off), int(w.row_off), int(w.width), int(w.height)),
            (int(w.width), int(w.height)),
        )
        for p, w in blocks
    ]
    vrt = staging / "scene.vrt"
    write_text_atomic(vrt, vrt_xml(grid.width, grid.height, grid.crs, grid.transform, sources, staging, tags))
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=PARTIAL)
    os.close(fd)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            rasterio.shutil.copy(vrt, tmp, **COG_OPTIONS)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # as a file opened normally (mkstemp makes it private)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def validate_cog(path: Path) -> None:
    """Check ``path`` with rio-cogeo's validator (the check ``rio cogeo validate`` runs).

    Raises:
        TuneAgbError: naming the file and the validator's first error.
    """
    from rio_cogeo.cogeo import cog_validate

    valid, errors, _ = cog_validate(str(path), quiet=True)
    if not valid:
        raise TuneAgbError(f"{path}: not a valid Cloud-Optimised GeoTIFF ({'; '.join(errors)[:200]})")


def crs_label(crs: CRS) -> str:
    """A file-name-safe name of a CRS: ``EPSG32647``, or ``crs`` + a short hash of its WKT."""
    epsg = crs.to_epsg()
    if epsg is not None:
        return f"EPSG{epsg}"
    import hashlib

    return "crs" + hashlib.sha1(crs.to_wkt().encode()).hexdigest()[:8]


def mosaic_vrt(out: Path, scenes: Sequence[tuple[Path, SceneGrid]], margin: int) -> None:
    """A VRT mosaic of scene COGs that share one CRS, on the pixel size and alignment of the first scene.

    Each scene is placed whole, then again on top of all scenes without the ``margin`` px along each edge that
    another scene lies beyond: a pixel near one scene's edge is taken from the interior of a scene that covers it.
    """
    first = scenes[0][1]
    res_x, res_y = first.transform.a, first.transform.e
    if first.transform.b or first.transform.d:
        raise TuneAgbError(f"{scenes[0][0]}: a rotated grid cannot be mosaicked")
    x0, y0 = first.transform.c, first.transform.f
    placed = []
    for path, g in scenes:
        t = g.transform
        # the scene's corners in pixels of the mosaic's grid (rounded: scenes on the same pixel grid land exactly)
        col0 = round((t.c - x0) / res_x)
        row0 = round((t.f - y0) / res_y)
        cols = round(g.width * t.a / res_x)
        rows = round(g.height * t.e / res_y)
        placed.append((path, g, col0, row0, cols, rows))
    min_c = min(p[2] for p in placed)
    min_r = min(p[3] for p in placed)
    width = max(p[2] + p[4] for p in placed) - min_c
    height = max(p[3] + p[5] for p in placed) - min_r
    transform = Affine(res_x, 0.0, x0 + min_c * res_x, 0.0, res_y, y0 + min_r * res_y)
    rects = [(c0 - min_c, r0 - min_r, cols, rows) for _, _, c0, r0, cols, rows in placed]
    whole, inner = [], []
    for k, (path, g, _, _, cols, rows) in enumerate(placed):
        c0, r0, _, _ = rects[k]
        whole.append(Source(path, (0, 0, g.width, g.height), (c0, r0, cols, rows), (g.width, g.height)))
        if margin <= 0 or cols != g.width or rows != g.height:
            continue
        others = rects[:k] + rects[k + 1 :]
        # trim a side only where another scene lies just beyond it (elsewhere the edge is the mosaic's edge)
        m = margin
        left = m * _touches((c0 - m, r0, m, rows), others)
        right = m * _touches((c0 + cols, r0, m, rows), others)
        top = m * _touches((c0, r0 - m, cols, m), others)
        bottom = m * _touches((c0, r0 + rows, cols, m), others)
        w, h = cols - left - right, rows - top - bottom
        if (left or right or top or bottom) and w > 0 and h > 0:
            inner.append(Source(path, (left, top, w, h), (c0 + left, r0 + top, w, h), (g.width, g.height)))
    write_text_atomic(out, vrt_xml(width, height, first.crs, transform, whole + inner, out.parent))


def _touches(strip: Rect, rects: Sequence[Rect]) -> bool:
    """Whether any of ``rects`` intersects ``strip`` (all as x, y, width, height)."""
    x, y, w, h = strip
    return any(x < rx + rw and rx < x + w and y < ry + rh and ry < y + h for rx, ry, rw, rh in rects)
