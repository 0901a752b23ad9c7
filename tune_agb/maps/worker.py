"""The worker of a multi-scene map: loads the model once, then predicts blocks of any scene (reading only the
windows of the block, so its memory does not grow with the scene). Plain Python: :mod:`tune_agb.maps.run` runs it as
a Ray actor; nothing here imports Ray.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from tune_agb.engine.calibration import Calibration
from tune_agb.geo.raster import RasterStack, StackOptions, gdal_env
from tune_agb.maps.plan import Block, Scene
from tune_agb.predict import predict_row


def rss_anon_mb() -> float:
    """This process's anonymous resident memory (``RssAnon`` of /proc/self/status) in MB; 0 where not on Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _node_id() -> str:
    """The Ray node this runs on when it runs in Ray (the host name otherwise)."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        return ray.get_runtime_context().get_node_id()
    return os.uname().nodename


@dataclass(frozen=True)
class WorkerSettings:
    """What every worker of one map is given: the model, how to read the stacks and the windows."""

    model: str
    device: str
    calibration: Calibration
    stack: StackOptions
    tile: int
    overlap: int
    batch_size: int
    threads: int  # torch intra-op threads (the worker's CPUs)
    gpu_fraction: float = 0.0  # the worker's share of its GPU: caps torch's memory there (Ray does not isolate it)


class BlockWorker:
    """Predicts blocks with one loaded model; keeps the last scene's images open."""

    def __init__(self, settings: WorkerSettings):
        import torch

        from tune_agb.engine.inference import load_predictor
        from tune_agb.forest_mix import load_forest_part

        torch.set_num_threads(max(1, settings.threads))
        self.settings = settings
        self.predictor = load_predictor(settings.model, device=settings.device)
        self.forest = load_forest_part(settings.model)
        dev = self.predictor.device
        if dev.type == "cuda" and 0 < settings.gpu_fraction < 1:
            torch.cuda.set_per_process_memory_fraction(settings.gpu_fraction, dev)
        self._env = gdal_env()
        self._env.__enter__()
        self._scene: Scene | None = None
        self._stack: RasterStack | None = None
        self.blocks = 0

    def _open(self, scene: Scene) -> RasterStack:
        if self._scene != scene or self._stack is None:
            if self._stack is not None:
                self._stack.close()
            self._stack = None
            self._stack = self.settings.stack.open(list(scene.images))
            self._scene = scene
        return self._stack

    def predict(self, scene: Scene, block: Block) -> tuple[str, str, np.ndarray, dict[str, Any]]:
        """The block's map: (scene name, block name, float32 (2, h, w) mean and calibrated std, facts).

        The facts: ``seconds``, ``rss_anon_mb`` (after the block), ``pid``, ``node`` (the host name), ``device``.
        """
        t0 = time.perf_counter()
        s = self.settings
        stack = self._open(scene)
        s2_pos = s.stack.s2_positions(stack)
        parts = [
            predict_row(
                self.predictor,
                stack,
                row,
                block.cols,
                s.batch_size,
                s2_pos,
                s.stack.s2_offset,
                s.calibration,
                forest=self.forest,
            )
            for row in block.rows
        ]
        out = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)
        self.blocks += 1
        facts = {
            "seconds": time.perf_counter() - t0,
            "rss_anon_mb": rss_anon_mb(),
            "pid": os.getpid(),
            "node": _node_id(),
            "device": str(self.predictor.device),
        }
        return scene.name, block.name, out, facts

    def ready(self) -> str:
        """The device the model is on (a call that returns once the model is loaded)."""
        return str(self.predictor.device)
