"""The data paths alone (no model): set-up time and peak memory per rank at 1 and 2 ranks, and the loader's images/s,
for the paths a data set can take:

- cached: decoded once by each rank into its own memory (`data.cache_disk_gb 0`);
- shared: decoded once by one rank into the machine's shared cache, memory-mapped by every rank (its folder
  emptied first);
- reused: the shared cache as a later run finds it (filled by the previous row, or by this row's first run);
- uncached: decoded by loader workers every epoch (`data.cache none`);
- streamed: prepared shards (`ddpm-lightning prepare`), read by loader workers;
- bare: no data, the imports alone: the baseline of the memory figures.

    python benchmarks/data.py                                  # 2,000 PNGs of 64 px, 1 and 2 ranks, every path
    python benchmarks/data.py --images 20000 --ranks 1,2 --paths cached,shared,streamed --work-dir /tmp/bench-data

Each rank is a process of its own (gloo, as DDP on CPU): it builds `ImageDataModule` on the data, its training
loader and first batch (set-up), then draws one epoch (images/s); the ranks end together. Memory is the peak of
the proportional set size (PSS: each shared page counted once, split between the processes that map it, as the
shared cache's pixels and the libraries' code are) of all the ranks and their loader workers together, sampled
every 20 ms or so: what the run takes of the machine's memory. Then the same without the libraries' code (their
anonymous and shared memory, and the files they map under --work-dir: the shared cache, the shards), whose PSS
also depends on how many other processes on the machine map the same libraries. Beside them, each rank's peak
resident size (RSS: shared pages counted in full by every process that maps them). All include the imports'
(`bare`: about 1.1 GB RSS per process on CPU: torch, Lightning, datasets). The images are random PNGs made once in
--work-dir, the shards prepared once beside them. The load average is the machine's at the row's start (other jobs
skew the times). The same script runs on a GPU machine (the data paths run on the CPU either way).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]


def make_images(folder: Path, n: int, size: int) -> Path:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(len(list(folder.glob("*.png"))), n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:06d}.png")
    return folder


def pss(pid: int | str, data_dir: str) -> tuple[int, int]:
    """A process's proportional set size in bytes, all of it and without the libraries' code: its anonymous and
    shared memory and the files under `data_dir` it maps (the shared cache, the shards). (0, 0) once it has ended."""
    try:
        rollup = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]
        maps = Path(f"/proc/{pid}/smaps").read_text().splitlines()
    except OSError:
        return 0, 0
    field = {name: int(value.split()[0]) * 1024 for name, value in (line.split(":", 1) for line in rollup)}
    own, in_data = field["Pss_Anon"] + field["Pss_Shmem"], False
    for line in maps:
        words = line.split()
        if "-" in words[0] and not words[0].endswith(":"):  # a mapping's first line: address range ... path
            in_data = len(words) > 5 and words[5].startswith(data_dir)
        elif in_data and words[0] == "Pss:":
            own += int(words[1]) * 1024
    return field["Pss"], own


def children(pid: int | str) -> list[str]:
    """Every process under `pid` (loader workers, and theirs)."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += (task / "children").read_text().split()
        except OSError:
            pass
    return found + [grandchild for child in found for grandchild in children(child)]


def together(pids: list[int], data_dir: str) -> tuple[int, int]:
    """`pss` of processes and all under them, summed at this instant: what they take of the machine's memory."""
    sizes = [pss(p, data_dir) for pid in pids for p in [pid, *children(pid)]]
    return sum(size[0] for size in sizes), sum(size[1] for size in sizes)


def child(path: str, dataset: str, size: int, batch: int, workers: int, cache_dir: str) -> dict:
    """One rank: set-up (data module, loader, first batch), then one epoch; its peak RSS. The ranks end together,
    so the memory they share is shared until the last sample (`run` samples their PSS together). `bare`: the
    imports alone, the baseline of the memory figures."""
    import warnings

    import torch
    import torch.distributed as dist

    warnings.filterwarnings("ignore", message="'set_vital' is deprecated")  # torchdata's, every loader

    world = int(os.environ["WORLD_SIZE"])
    if world > 1:
        dist.init_process_group("gloo")
    torch.manual_seed(0)
    from ddpm_lightning.data import ImageDataModule

    if path == "bare":
        time.sleep(1)  # (sampled)
        return {
            "setup_s": 0,
            "images_per_s": 0,
            "rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2),
        }
    start = time.perf_counter()
    cache = {"cached": "memory", "shared": "memory", "reused": "memory", "uncached": "none", "streamed": "auto"}[path]
    disk_gb = 0 if path == "cached" else 100  # (cached: each rank decodes into its own memory)
    dm = ImageDataModule(
        dataset, image_size=size, train_batch_size=batch, num_workers=workers, cache=cache, cache_dir=cache_dir,
        cache_disk_gb=disk_gb,
    )  # fmt: skip
    # what the data module asks of Lightning's trainer: the device, the ranks (the cached order's split), no bar
    dm.trainer = SimpleNamespace(
        strategy=SimpleNamespace(root_device=torch.device("cpu")),
        world_size=int(os.environ["WORLD_SIZE"]),
        global_rank=int(os.environ["RANK"]),
        progress_bar_callback=None,
    )
    dm.setup("fit")
    batches = iter(dm.train_dataloader())
    images = len(next(batches))
    setup = time.perf_counter() - start
    start = time.perf_counter()
    for b in batches:
        images += len(b)
    seconds = time.perf_counter() - start
    if world > 1:
        dist.barrier()
    return {
        "setup_s": round(setup, 2),
        "images_per_s": round(images / max(seconds, 1e-9)),
        "rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2),
    }


def run(path: str, dataset: str, ranks: int, args) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(ranks)}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    cache_dir = Path(args.work_dir) / "decoded"
    if path == "shared":
        shutil.rmtree(cache_dir, ignore_errors=True)
    command = [sys.executable, __file__, "--child", path, dataset, str(args.size), str(args.batch), str(args.workers)]
    command.append(str(cache_dir))
    procs = [subprocess.Popen(command, env={**env, "RANK": str(r)}, stdout=subprocess.PIPE) for r in range(ranks)]
    peak = (0, 0)
    while any(p.poll() is None for p in procs):  # (each prints one short line: its pipe never fills)
        now = together([p.pid for p in procs], str(Path(args.work_dir).resolve()))
        peak = (max(peak[0], now[0]), max(peak[1], now[1]))
        time.sleep(0.02)
    results = [json.loads(p.communicate()[0].decode().strip().splitlines()[-1]) for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit(f"{path} at {ranks} ranks failed")
    return results, peak


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        path, dataset, size, batch, workers, cache_dir = sys.argv[2:8]
        print(json.dumps(child(path, dataset, int(size), int(batch), int(workers), cache_dir)))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--size", type=int, default=64, help="the images' side, and the training image_size")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2, help="loader workers (uncached, streamed)")
    parser.add_argument("--ranks", default="1,2")
    parser.add_argument("--paths", default="bare,cached,shared,reused,uncached,streamed")
    parser.add_argument("--work-dir", default=None, help="keeps the images and shards between runs")
    args = parser.parse_args()
    args.work_dir = args.work_dir or tempfile.mkdtemp(prefix="bench-data-")
    work = Path(args.work_dir)
    photos = make_images(work / f"photos-{args.images}-{args.size}", args.images, args.size)
    shards = work / f"shards-{args.images}-{args.size}"
    if "streamed" in args.paths and not (shards / "ddpm_prepared.json").is_file():
        from ddpm_lightning.commands import prepare

        start = time.perf_counter()
        prepare(str(photos), str(shards), image_size=args.size, num_workers=args.workers)
        print(f"prepare: {time.perf_counter() - start:.1f} s for {args.images} images")
    print(
        "| path | ranks | load avg | set-up s (per rank) | peak PSS GB, all ranks and workers | the same without "
        "the libraries' code | peak RSS GB (per rank) | images/s (per rank) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for path in args.paths.split(","):
        for ranks in map(int, args.ranks.split(",")):
            load = os.getloadavg()[0]
            results, peak = run(path, str(shards if path == "streamed" else photos), ranks, args)
            cells = [" / ".join(str(r[key]) for r in results) for key in ("setup_s", "rss_gb", "images_per_s")]
            cells.insert(1, f"{peak[0] / 1e9:.2f} | {peak[1] / 1e9:.2f}")
            print(f"| {path} | {ranks} | {load:.1f} | {' | '.join(cells)} |", flush=True)


if __name__ == "__main__":
    main()
