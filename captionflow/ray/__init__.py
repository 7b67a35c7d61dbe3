"""Batch captioning on a Ray cluster (``pip install 'captionflow[ray]'``).

- :func:`decode_stage`: the CPU stage, a function for ``Dataset.map_batches`` (Ray tasks)
  that fetches, probes, decodes and samples each row's video with captionflow's video code.
- :class:`CaptionActor`: the engine stage, a callable class for ``Dataset.map_batches``
  (an actor pool, one engine per actor) that captions the decoded rows.
- :func:`run_ray_file`: ``captionflow run --ray``, both stages between a row file and
  its output.

Nothing else in captionflow imports this package (the CLI does, lazily, for ``--ray``).
"""

from captionflow.ray.actor import CaptionActor
from captionflow.ray.decode import decode_stage
from captionflow.ray.job import RayPlan, RayStats, run_ray_file

__all__ = ["CaptionActor", "RayPlan", "RayStats", "decode_stage", "run_ray_file"]
