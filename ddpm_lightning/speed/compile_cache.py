"""torch.compile's caches beside the run's checkpoints.

So a resume, or a run on another machine that sees the same folder, starts warm.

Inductor keeps its compiled graphs, kernels and autotuning results (FX graph, AOTAutograd and Triton caches) in
`TORCHINDUCTOR_CACHE_DIR`, by default `/tmp/torchinductor_$USER`: lost on a new machine, a cluster node or a
container restart, where a compiled run pays its whole compile again. Unless the user has set it, it is pointed at
`compile-cache/` beside the checkpoint folder (`checkpoints/compile-cache` for the default `checkpoints/<name>`),
which every run started from the same place shares. The cache checks torch, Triton and the GPU itself: a hit on
another machine needs the same versions and card.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

VARIABLE = "TORCHINDUCTOR_CACHE_DIR"
log = logging.getLogger(__name__)


def keep_compile_cache(checkpoint_dir: str) -> str | None:
    """Point inductor's cache at `compile-cache/` beside `checkpoint_dir`, unless the user chose another place.

    The user chose one when TORCHINDUCTOR_CACHE_DIR is set to another place than inductor's default. Returns the
    folder used, or None when left to the user's setting (or when that folder cannot be created).
    """
    # Private, and imported here only: a run that compiles nothing never loads inductor.
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    if os.environ.get(VARIABLE, "") not in ("", default_cache_dir()):
        return None  # the user's (importing Lightning sets it to inductor's default: not a choice)
    folder = Path(checkpoint_dir).resolve().parent / "compile-cache"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        log.info(f"Compile cache left at inductor's default: cannot create {folder} ({err})")
        return None
    os.environ[VARIABLE] = str(folder)  # read by inductor at its first compile, and by DDP's child processes
    return str(folder)
