"""Maps at scale: many scenes (and scenes of any size) predicted block by block on Ray, one validated COG per scene
and one mosaic VRT per CRS, resumable (see :func:`map_scenes`; the command is ``python -m tune_agb.predict
--scenes ...``).

Layout of ``OUT``: ``SCENE.tif`` (a COG per scene: bands ``mean`` and ``std``, NaN nodata), ``mosaic_EPSGnnnn.vrt``
(one per CRS), and while a map is unfinished ``.staging/SCENE/`` (its finished blocks; see :mod:`.plan`). For an
``s3://`` (or other remote) ``OUT`` the staging and assembly happen in a local work folder and the finished COGs and
VRTs are uploaded (:mod:`.remote`).
"""

from tune_agb.maps.plan import Block, Scene, block_plan, parse_scenes
from tune_agb.maps.run import MapsSummary, SceneResult, map_scenes

__all__ = ["Block", "MapsSummary", "Scene", "SceneResult", "block_plan", "map_scenes", "parse_scenes"]
