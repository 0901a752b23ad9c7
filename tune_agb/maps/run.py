"""Mapping many scenes on Ray: :func:`map_scenes`.

The driver (this process) checks every scene and the model first, cuts each scene into blocks on the model's window
grid (:mod:`tune_agb.maps.plan`), and hands the blocks not yet staged to Ray actors (:class:`BlockWorker`: the model
loaded once per worker, ``cpus_per_worker``/``gpus_per_worker`` Ray resources each, fractions allowed). Each finished
block comes back through Ray's object store and is written by the driver as a small GeoTIFF in the staging folder
(inputs must be readable from every node; outputs need only the driver's disk). When a scene's last block is staged
its COG is assembled, validated with rio-cogeo and moved into place; at the end one mosaic VRT per CRS is written.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from tune_agb.errors import TuneAgbError
from tune_agb.geo.raster import StackOptions, gdal_env
from tune_agb.location import first_line, is_uri, resolve
from tune_agb.maps.output import SceneGrid, crs_label, mosaic_vrt, scene_cog, validate_cog, write_block
from tune_agb.maps.plan import PLAN_FORMAT, Block, Scene, Staging, block_plan
from tune_agb.maps.remote import default_work_dir, final_location, remote_exists, upload
from tune_agb.maps.worker import BlockWorker, WorkerSettings
from tune_agb.predict import check_band_count, resolve_calibration, resolve_windows

log = logging.getLogger(__name__)

IN_FLIGHT_PER_WORKER = 2  # blocks queued per worker: one computing, one waiting (keeps workers busy, memory bounded)


@dataclass
class SceneResult:
    """One scene of a map: where its COG is, its grid, its blocks and how many of them this run computed."""

    scene: Scene
    out: Path  # in the work folder (where it stays for a local output)
    final: str  # where the COG ends up: ``out`` or a URI
    grid: SceneGrid
    plan: list[Block] = field(repr=False)
    computed: int = 0
    kept: bool = False
    done: bool = False  # its COG was made by this run  # the COG was already there (a finished scene of an earlier run)


@dataclass
class MapsSummary:
    """What :func:`map_scenes` did."""

    out_dir: str
    scenes: list[SceneResult]
    mosaics: list[str]
    blocks: int
    computed: int
    pixels: int  # pixels of the scenes whose blocks this run computed (all of each such scene)
    seconds: float  # wall time of the block predictions (Ray start and model loading included)
    startup_seconds: float  # of which joining Ray, starting the workers and loading the model on each
    assemble_seconds: float  # of which assembling, validating and moving scene COGs (on the driver)
    workers: int
    worker_rss_anon_mb: float  # the largest RssAnon a worker reported after a block
    nodes: set[str] = field(default_factory=set)


def map_scenes(
    model: str | Path,
    scenes: Sequence[Scene],
    out_dir: str | Path,
    *,
    tile_size: int = 512,
    overlap: int | None = None,
    block_size: int = 2048,
    batch_size: int = 8,
    device: str = "auto",
    calibration: str = "auto",
    stack: StackOptions | None = None,
    address: str | None = None,
    workers: int | None = None,
    cpus_per_worker: float = 1.0,
    gpus_per_worker: float = 0.0,
    overwrite: bool = False,
    progress: bool = True,
    work_dir: str | Path | None = None,
) -> MapsSummary:
    """Map many scenes with a trained model on Ray: one COG per scene (bands ``mean`` and ``std``, NaN nodata) in
    ``out_dir``, and one mosaic VRT per CRS (``mosaic_EPSGnnnn.vrt``).

    Resumable: finished blocks are staged in ``WORK/.staging`` (``WORK``: ``out_dir`` itself when local); a rerun
    predicts only the blocks missing, and a scene whose COG exists at ``out_dir`` is kept (``overwrite`` redoes it).

    Args:
        model: a checkpoint ``.pt``, a final training's out dir, or an ensemble's out dir.
        scenes: the scenes (see :func:`tune_agb.maps.parse_scenes`).
        out_dir: folder of the outputs: local, or ``s3://``/``gs://``... (made in ``work_dir``, then uploaded).
        tile_size: window side (px), as for :func:`tune_agb.predict.predict_map`.
        overlap: px shared by neighbouring windows (default: twice the model's seam margin).
        block_size: about the side (px) of the blocks a worker predicts at once: whole windows, at least one.
        batch_size: windows per forward pass.
        device: the workers' device: ``auto`` (the GPU Ray gives a worker with ``gpus_per_worker`` > 0, else the
            CPU), ``cpu``, ``cuda``.
        calibration: ``auto`` (the model's calibration.json if any), ``none``, or a calibration.json path.
        stack: band selection, resampling and Sentinel-2 digital-number scaling of every scene.
        address: None starts a local Ray here; ``auto`` or ``HOST:PORT`` joins a running cluster.
        workers: Ray actors to start (default: as many as the cluster's CPUs/GPUs allow at the given sizes).
        cpus_per_worker: Ray CPUs per worker (fractions allowed; also torch's thread count, at least 1).
        gpus_per_worker: Ray GPUs per worker (fractions allowed, e.g. 0.25: four workers per GPU).
        overwrite: recompute scenes whose COG exists.
        progress: a progress bar over blocks.
        work_dir: local folder where blocks are staged and COGs assembled (default: ``out_dir`` when local,
            ``./.tune_agb_maps/<out_dir as a name>`` for a remote one).

    Raises:
        TuneAgbError: one line naming the scene, flag or model that is wrong (checked before Ray starts).
    """
    if tile_size < 16:
        raise TuneAgbError(f"--tile-size: must be >= 16 px, got {tile_size}")
    if overlap is not None and not 0 <= overlap < tile_size:
        raise TuneAgbError(f"--overlap: must be >= 0 and smaller than --tile-size ({tile_size}), got {overlap}")
    if batch_size < 1 or block_size < 1:
        raise TuneAgbError(f"--batch-size / --block-size: must be >= 1, got {batch_size} / {block_size}")
    if cpus_per_worker <= 0 or gpus_per_worker < 0:
        raise TuneAgbError("--cpus-per-worker must be > 0 and --gpus-per-worker >= 0")
    if workers is not None and workers < 1:
        raise TuneAgbError(f"--workers: must be >= 1, got {workers}")
    dest = str(out_dir) if is_uri(str(out_dir)) else resolve(str(out_dir))
    if work_dir is not None:
        out = Path(resolve(str(work_dir)))
    else:
        out = default_work_dir(dest) if is_uri(dest) else Path(dest)
    for folder, flag in ((Path(dest), "--out"), (out, "--work-dir")):
        if not is_uri(str(folder)) and folder.exists() and not folder.is_dir():
            raise TuneAgbError(f"{flag} {folder}: exists and is not a folder (with --scenes it is a folder)")
    options = stack or StackOptions()
    cal = resolve_calibration(str(model), calibration)
    from tune_agb.engine.inference import load_predictor
    from tune_agb.forest_mix import load_forest_part

    predictor = load_predictor(model, device="cpu")  # checks the model before anything starts; gives the grid step
    tile, ov = resolve_windows(tile_size, overlap, predictor, load_forest_part(model))
    margin = predictor.margin if predictor.margin is not None else ov // 2
    model_path = Path(model).absolute()
    results, todo = _plan(scenes, out, dest, predictor, str(model), options, tile, ov, block_size, cal, overwrite)
    total = sum(len(r.plan) for r in results)
    queued = sum(len(b) for _, b in todo.values())
    members = len(predictor.members)
    del predictor
    # Ray leaves GPUs visible to a worker that asked for none: "auto" would take one it was not given
    worker_device = "cpu" if device == "auto" and gpus_per_worker == 0 else device
    settings = WorkerSettings(
        str(model_path),
        worker_device,
        cal,
        options,
        tile,
        ov,
        batch_size,
        max(1, math.floor(cpus_per_worker)),
        gpus_per_worker,
    )
    facts: dict[str, Any] = {"rss": 0.0, "nodes": set(), "workers": 0, "seconds": 0.0, "startup": 0.0, "assemble": 0.0}
    bar = tqdm(total=total, initial=total - queued, desc="map", unit="block", disable=not progress)
    tags = {"model": str(model), "members": str(members), "calibration": cal.describe()}
    try:
        if queued:
            _run_blocks(
                results, todo, out, settings, tags, address, workers, cpus_per_worker, gpus_per_worker, bar, facts
            )
        for r in results:  # scenes whose blocks were all staged by an earlier run
            if not r.kept and not r.done:
                _finish_scene(r, out, tags)
    finally:
        bar.close()
    mosaics = _mosaics(results, out, dest, margin)
    computed = sum(r.computed for r in results)
    pixels = sum(r.grid.height * r.grid.width for r in results if r.computed)
    return MapsSummary(
        dest,
        results,
        mosaics,
        total,
        computed,
        pixels,
        facts["seconds"],
        facts["startup"],
        facts["assemble"],
        facts["workers"],
        facts["rss"],
        facts["nodes"],
    )


def _plan(
    scenes: Sequence[Scene],
    out: Path,
    dest: str,
    predictor: Any,
    model: str,
    options: StackOptions,
    tile: int,
    overlap: int,
    block_size: int,
    cal: Any,
    overwrite: bool,
) -> tuple[list[SceneResult], dict[str, tuple[SceneResult, list[Block]]]]:
    """Check every scene (readable, the model's band count) and plan its blocks; stage folders prepared."""
    results: list[SceneResult] = []
    todo: dict[str, tuple[SceneResult, list[Block]]] = {}
    grids = {}
    with gdal_env():
        for scene in scenes:
            with options.open(list(scene.images)) as st:
                check_band_count(st, predictor, model, scene.images)
                options.s2_positions(st)  # refuses --s2-dn for a stack without Sentinel-2 bands
                g = st.grid
                grids[scene.name] = SceneGrid(g.height, g.width, g.crs, g.transform)
    out.mkdir(parents=True, exist_ok=True)
    for scene in scenes:
        grid = grids[scene.name]
        blocks = block_plan(grid.height, grid.width, tile, overlap, block_size)
        name = f"{scene.name}.tif"
        result = SceneResult(scene, out / name, final_location(dest, name), grid, blocks)
        results.append(result)
        staging = Staging(out, scene.name)
        if remote_exists(result.final) and not overwrite:
            result.kept = True
            staging.remove()
            log.info("%s: kept (use --overwrite to map it again)", result.final)
            continue
        plan = {
            "format": PLAN_FORMAT,
            "model": str(Path(model).absolute()),
            "model_files": [_stamp(str(p)) for p in _member_checkpoints(model)],
            "images": [_stamp(p) for p in scene.images],
            "bands": list(options.bands or ()),
            "resampling": options.resampling,
            "s2_offset": options.s2_offset,
            "calibration": cal.describe(),
            "tile": tile,
            "overlap": overlap,
            "blocks": [b.name for b in blocks],
            "grid": [grid.height, grid.width, grid.crs.to_wkt(), list(grid.transform)[:6]],
        }
        staging.prepare(plan)
        done = staging.finished(blocks)
        missing = [b for b in blocks if b.name not in done]
        if missing:
            todo[scene.name] = (result, missing)
    return results, todo


def _member_checkpoints(model: str) -> list[Any]:
    """The model's files whose change makes a staged map stale: its members' checkpoints and its forest part's."""
    from tune_agb.engine.inference import member_checkpoints  # torch: imported only to map
    from tune_agb.forest_mix import part_files

    return [*member_checkpoints(model), *part_files(model)]


def _stamp(path: str) -> list[Any]:
    """A file with its size and modification time (a changed model or image invalidates staged blocks)."""
    try:
        st = os.stat(path)
    except OSError:  # a URI (the rasters' own check has read it)
        return [path]
    return [path, st.st_size, st.st_mtime_ns]


def _run_blocks(
    results: list[SceneResult],
    todo: dict[str, tuple[SceneResult, list[Block]]],
    out: Path,
    settings: WorkerSettings,
    tags: dict[str, str],
    address: str | None,
    workers: int | None,
    cpus: float,
    gpus: float,
    bar: Any,
    facts: dict[str, Any],
) -> None:
    """Predict the missing blocks on Ray actors; stage each as it lands and finish each scene when complete."""
    import ray

    from tune_agb.search.launch import init_ray

    t0 = time.perf_counter()
    started = not ray.is_initialized()
    init_ray(address)
    try:
        n = _worker_count(ray.cluster_resources(), workers, cpus, gpus)
        queue = deque((results_scene, b) for results_scene, blocks in todo.values() for b in blocks)
        n = min(n, len(queue))
        facts["workers"] = n
        actor_cls = ray.remote(max_restarts=2, max_task_retries=2)(BlockWorker)
        actors = [actor_cls.options(num_cpus=cpus, num_gpus=gpus).remote(settings) for _ in range(n)]
        _get(ray, [a.ready.remote() for a in actors], "starting the workers")  # each has loaded the model
        facts["startup"] = time.perf_counter() - t0
        remaining = {name: len(blocks) for name, (_, blocks) in todo.items()}
        pending: dict[Any, tuple[SceneResult, Block]] = {}  # Ray reference -> the block it computes
        k = 0
        while queue or pending:
            while queue and len(pending) < n * IN_FLIGHT_PER_WORKER:
                r, b = queue.popleft()
                pending[actors[k % n].predict.remote(r.scene, b)] = (r, b)
                k += 1
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                r, block = pending.pop(ref)
                scene, _, data, f = _get(ray, ref, f"{r.scene.name} block {block.name}")
                write_block(Staging(out, scene).block_path(block), data, r.grid, block.window)
                del data
                r.computed += 1
                facts["rss"] = max(facts["rss"], f["rss_anon_mb"])
                facts["nodes"].add(f["node"])
                bar.update(1)
                remaining[scene] -= 1
                if remaining[scene] == 0:
                    t1 = time.perf_counter()
                    _finish_scene(r, out, tags)
                    facts["assemble"] += time.perf_counter() - t1
        facts["seconds"] = time.perf_counter() - t0
        for a in actors:
            ray.kill(a)
    finally:
        if started:
            ray.shutdown()


def _get(ray: Any, refs: Any, what: str) -> Any:
    """``ray.get`` with a worker's failure as one line: its own TuneAgbError message (an image a node cannot read),
    or the first line of what Ray reports (a worker that died more often than it is restarted)."""
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as exc:
        cause = exc.cause if isinstance(exc.cause, BaseException) else exc
        raise TuneAgbError(f"{what}: failed on a Ray worker: {first_line(cause)}") from None
    except ray.exceptions.RayError as exc:
        raise TuneAgbError(f"{what}: the Ray worker was lost ({first_line(exc)})") from None


def _worker_count(cluster: dict[str, float], workers: int | None, cpus: float, gpus: float) -> int:
    """The workers to start: ``workers`` when the cluster can hold that many at once (as many as it can otherwise).

    Raises:
        TuneAgbError: when not even one worker fits (Ray would wait forever).
    """
    if gpus > 0 and cluster.get("GPU", 0) < gpus:
        raise TuneAgbError(
            f"--gpus-per-worker {gpus:g}: the Ray cluster has {cluster.get('GPU', 0):g} GPUs "
            "(use --gpus-per-worker 0 to map on CPUs)"
        )
    if cluster.get("CPU", 0) < cpus:
        raise TuneAgbError(
            f"--cpus-per-worker {cpus:g}: the Ray cluster has only {cluster.get('CPU', 0):g} CPUs (lower it)"
        )
    fit = math.floor(cluster.get("CPU", 0) / cpus + 1e-9)
    if gpus > 0:
        fit = min(fit, math.floor(cluster.get("GPU", 0) / gpus + 1e-9))
    if workers is not None and workers > fit:
        log.warning("--workers %d: the cluster holds %d at a time at these sizes; the rest would wait", workers, fit)
    return max(1, min(workers or fit, fit))


def _finish_scene(r: SceneResult, out: Path, tags: dict[str, str]) -> None:
    """Assemble, validate and move the scene's COG into place; its staging folder is then removed."""
    staging = Staging(out, r.scene.name)
    blocks = []
    for b in r.plan:
        path = staging.block_path(b)
        if not path.is_file():
            raise TuneAgbError(f"{path}: a staged block is missing; run the command again to compute it")
        blocks.append((path, b.window))
    with gdal_env():  # GDAL's block cache bounded while the COG driver copies the scene
        scene_cog(r.out, r.grid, blocks, {**tags, "scene": r.scene.name}, staging.root)
    validate_cog(r.out)
    if r.final != str(r.out):
        upload(r.out, r.final)
        r.out.unlink()
    staging.remove()
    r.done = True


def _mosaics(results: list[SceneResult], out: Path, dest: str, margin: int) -> list[str]:
    """One mosaic VRT per CRS of the scenes' COGs (``mosaic_EPSGnnnn.vrt``); mosaics of CRSs no longer mapped stay."""
    by_crs: dict[str, list[SceneResult]] = {}
    for r in results:
        by_crs.setdefault(crs_label(r.grid.crs), []).append(r)
    paths = []
    for label, rs in by_crs.items():
        path = out / f"mosaic_{label}.vrt"
        mosaic_vrt(path, [(r.out, r.grid) for r in rs], margin)  # scenes named relative to it: a.tif, b.tif ...
        final = final_location(dest, path.name)
        if final != str(path):
            upload(path, final)
            path.unlink()
        paths.append(final)
    return paths
