"""The data layer: what `--data.dataset` names turned into training batches, one subsystem in four files.

- datamodule.py: `ImageDataModule`, the resumable order of the images, the per-batch flip and scaling.
- images.py: decoding and resizing each image, the decoding pass that fills the cache, the cache in memory.
- shared_cache.py: the decoded pixels shared by the processes of a machine and reused by its later runs.
- shards.py: `ddpm-lightning prepare`'s shards, streamed per rank and worker (LitData).

Where an image comes from (a folder, a data set, a Hub id) is sources.py's, beside this package.
"""

from .datamodule import ImageDataModule

__all__ = ["ImageDataModule"]
