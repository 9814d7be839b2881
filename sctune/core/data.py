"""Datasets by name, split with fixed seeds, served from tensors resident on the training device.

Built-ins:
  * ``digits``  scikit-learn's bundled 8x8 digits (1,797 images): the embedded default, no download.
  * ``mnist1d`` MNIST-1D generated locally by the ``mnist1d`` package (``make_dataset``, no download).
  * ``cifar10`` / ``cifar100`` through torchvision's real loaders from ``data_root``; fetched only
    when ``download=True``.
  * ``synthetic`` / ``synthetic_cifar``: learnable Gaussian-prototype data of a chosen shape, for
    GPU checks and benchmarks where CIFAR cannot be downloaded.

``register_dataset`` adds a user's own dataset under a new name; ``task.dataset: module:function`` names
one without registering it, and ``task.modules`` are imported first (see ``sctune.core.tasks``).

The ``DeviceLoader`` keeps the whole training set as one tensor on the device and augments whole
batches with tensor ops (random crop with padding, horizontal flip), so no per-image Python or PIL
work runs in the training loop (METHOD.md section 7: airbench/hlb-CIFAR10 keep data on the GPU).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import ConfigError, TaskConfig
from .tasks import DATASETS, import_modules

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DatasetSplits:
    """Tensors on the CPU; ``x_*`` float32 (N, C, ...), ``y_*`` int64 (N,)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    augment: bool = False  # the dataset's default for crop+flip augmentation
    name: str = ""

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.y_train), "val": len(self.y_val), "test": len(self.y_test)}


# A loader returns (x_trainval, y_trainval, x_test, y_test, num_classes, augment_default);
# the validation split is carved from train+val by ``load_dataset`` with a fixed seed.
RawData = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, bool]
DatasetFn = Callable[[TaskConfig], RawData]


def register_dataset(name: str, fn: DatasetFn | None = None, *, overwrite: bool = False):
    """Register ``fn(task: TaskConfig) -> (x_train, y_train, x_test, y_test, num_classes, augment)``.

    Usable as a decorator. ``x_*`` are float tensors (N, C, ...) already normalised, ``y_*`` int64.
    """
    return DATASETS.register(name, fn, overwrite=overwrite)


def stratified_val_split(y: torch.Tensor, val_frac: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(y))
    tr, va = train_test_split(idx, test_size=val_frac, random_state=seed, stratify=y.numpy())
    return np.sort(tr), np.sort(va)


def dataset_fn(name: str) -> DatasetFn:
    """The loader a dataset name stands for: registered, or ``module:function`` (imported here)."""
    return DATASETS.lookup(name)


# Training-set sizes of datasets that live on disk, so a plan can count iterations on a machine without the
# files (a cluster's head node): CIFAR-10/100 hold 50,000 training images (Krizhevsky 2009).
KNOWN_TRAINVAL_SIZES = {"cifar10": 50_000, "cifar100": 50_000}


def known_split_sizes(task: TaskConfig) -> dict[str, int] | None:
    """Train/val sizes ``load_dataset`` would give, from ``KNOWN_TRAINVAL_SIZES`` (None if unknown).

    Same arithmetic as the split: scikit-learn's ``train_test_split`` puts ceil(val_frac x n) in validation."""
    n = KNOWN_TRAINVAL_SIZES.get(task.dataset)
    if n is None:
        return None
    val = math.ceil(task.val_frac * n)
    train = n - val if task.train_subset is None else min(task.train_subset, n - val)
    return {"train": train, "val": val}


def load_dataset(task: TaskConfig) -> DatasetSplits:
    """Load ``task.dataset`` and split train/val with ``task.data_seed`` (same split in every trial)."""
    import_modules(task)
    x, y, x_test, y_test, num_classes, augment = dataset_fn(task.dataset)(task)
    x, y = x.float(), y.long()
    tr, va = stratified_val_split(y, task.val_frac, task.data_seed)
    if task.train_subset is not None:
        if task.train_subset > len(tr):
            raise ConfigError("task.train_subset",
                              f"{task.train_subset} exceeds the {len(tr)} training samples of {task.dataset}")
        rng = np.random.default_rng(task.data_seed)
        tr = np.sort(rng.choice(tr, size=task.train_subset, replace=False))
    if task.train_on_val:  # the final refit: train on train + validation (validation metrics are then seen data)
        tr = np.sort(np.concatenate([tr, va]))
    tr_t, va_t = torch.from_numpy(tr), torch.from_numpy(va)
    return DatasetSplits(
        x_train=x[tr_t], y_train=y[tr_t], x_val=x[va_t], y_val=y[va_t],
        x_test=x_test.float(), y_test=y_test.long(), num_classes=num_classes,
        augment=augment if task.augment is None else task.augment, name=task.dataset,
    )


# -- built-in datasets --------------------------------------------------------------------------

@register_dataset("digits")
def _digits(task: TaskConfig) -> RawData:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0  # pixel range 0..16
    x = (x - 0.3) / 0.4  # roughly zero mean, unit variance
    y = torch.tensor(d.target, dtype=torch.long)
    # digits has no official test split: a fixed stratified 20% (seed 0, independent of data_seed).
    idx = np.arange(len(y))
    tr, te = train_test_split(idx, test_size=0.2, random_state=0, stratify=d.target)
    return x[tr], y[tr], x[te], y[te], 10, False


@register_dataset("mnist1d")
def _mnist1d(task: TaskConfig) -> RawData:
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.seed = 42  # the package's reference seed: the standard 4000/1000 MNIST-1D split
    d = make_dataset(args)
    x = torch.tensor(d["x"], dtype=torch.float32).unsqueeze(1)
    x_test = torch.tensor(d["x_test"], dtype=torch.float32).unsqueeze(1)
    mean, std = x.mean(), x.std()
    return ((x - mean) / std, torch.tensor(d["y"]).long(), (x_test - mean) / std,
            torch.tensor(d["y_test"]).long(), 10, False)


CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


def _cifar(task: TaskConfig, name: str) -> RawData:
    from torchvision import datasets

    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    root = Path(task.data_root).expanduser()
    try:
        train = cls(str(root), train=True, download=task.download)
        test = cls(str(root), train=False, download=task.download)
    except RuntimeError as e:  # torchvision: "Dataset not found or corrupted."
        raise ConfigError("task.data_root",
                          f"{name} not found under {root} ({e}); set task.download: true to fetch it "
                          "or point data_root at a copy in torchvision's CIFAR format") from None
    mean = torch.tensor(CIFAR_STATS[name][0]).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STATS[name][1]).view(1, 3, 1, 1)

    def to_tensor(ds) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.from_numpy(np.asarray(ds.data)).permute(0, 3, 1, 2).float() / 255.0  # NHWC uint8 -> NCHW
        return (x - mean) / std, torch.tensor(ds.targets, dtype=torch.long)

    x, y = to_tensor(train)
    x_test, y_test = to_tensor(test)
    return x, y, x_test, y_test, len(train.classes), True


register_dataset("cifar10", lambda task: _cifar(task, "cifar10"))
register_dataset("cifar100", lambda task: _cifar(task, "cifar100"))


def make_synthetic(*, n_train: int, n_test: int, shape: tuple[int, ...], num_classes: int,
                   seed: int = 0, noise: float = 1.0) -> tuple[torch.Tensor, ...]:
    """Learnable data: each class is a fixed random prototype, samples are prototype + noise."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn((num_classes, *shape), generator=g)
    n = n_train + n_test
    y = torch.randint(0, num_classes, (n,), generator=g)
    x = protos[y] + noise * torch.randn((n, *shape), generator=g)
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


@register_dataset("synthetic")
def _synthetic(task: TaskConfig) -> RawData:
    x, y, xt, yt = make_synthetic(n_train=2000, n_test=500, shape=(1, 8, 8), num_classes=10,
                                  seed=task.data_seed, noise=2.0)
    return x, y, xt, yt, 10, False


@register_dataset("synthetic_cifar")
def _synthetic_cifar(task: TaskConfig) -> RawData:
    """CIFAR-10-shaped stand-in (50k/10k, 3x32x32, 10 classes) for machines without the dataset."""
    x, y, xt, yt = make_synthetic(n_train=50_000, n_test=10_000, shape=(3, 32, 32), num_classes=10,
                                  seed=task.data_seed, noise=4.0)
    return x, y, xt, yt, 10, True


# -- device-resident loader ---------------------------------------------------------------------

def random_crop(x: torch.Tensor, *, padding: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Batched random crop with zero padding: each sample gets its own offset, one gather for all.

    Works for (N, C, L) and (N, C, H, W)."""
    if padding <= 0:
        return x
    spatial = x.dim() - 2
    padded = torch.nn.functional.pad(x, (padding, padding) * spatial)
    n = x.shape[0]
    dev = x.device
    idx = [torch.arange(n, device=dev).view(n, *([1] * (spatial + 1))),
           torch.arange(x.shape[1], device=dev).view(1, -1, *([1] * spatial))]
    for d in range(spatial):
        size = x.shape[2 + d]
        off = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device="cpu").to(dev)
        pos = off.view(n, 1) + torch.arange(size, device=dev).view(1, size)  # (n, size)
        shape = [n, 1] + [1] * spatial
        shape[2 + d] = size
        idx.append(pos.view(shape))
    return padded[tuple(idx)]


def random_flip(x: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """Batched horizontal flip (last axis) of a random half of the samples."""
    mask = torch.rand((x.shape[0],), generator=generator, device="cpu") < 0.5
    mask = mask.to(x.device).view(-1, *([1] * (x.dim() - 1)))
    return torch.where(mask, x.flip(-1), x)


class DeviceLoader:
    """Shuffled mini-batches from tensors kept on ``device``; augmentation as batched tensor ops.

    Iterating yields one epoch. The permutation and augmentation draw from a CPU generator seeded
    with ``seed`` and advanced per epoch, so a run is reproducible and resumable (``state_dict``).
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, *, batch_size: int, device: torch.device | str = "cpu",
                 shuffle: bool = True, drop_last: bool = True, augment: bool = False, crop_padding: int = 4,
                 flip: bool = True, seed: int = 0, channels_last: bool = False):
        if len(x) != len(y):
            raise ValueError(f"x and y differ in length: {len(x)} vs {len(y)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.x = x.to(self.device)
        self.channels_last = channels_last and self.x.dim() == 4
        if self.channels_last:
            self.x = self.x.contiguous(memory_format=torch.channels_last)
        self.y = y.to(self.device)
        self.batch_size = min(batch_size, len(x)) if drop_last else batch_size
        self.shuffle, self.drop_last, self.augment = shuffle, drop_last, augment
        self.crop_padding, self.flip = crop_padding, flip
        # 1-D signals get a random shift but no flip: reversing a sequence changes its class.
        self._flip_ok = flip and self.x.dim() == 4
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        n = len(self.y)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.seed = int(state["epoch"]), int(state["seed"])

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        self.epoch += 1
        n = len(self.y)
        order = torch.randperm(n, generator=g).to(self.device) if self.shuffle else None
        for i in range(len(self)):
            sl = slice(i * self.batch_size, min(n, (i + 1) * self.batch_size))
            if order is None:
                xb, yb = self.x[sl], self.y[sl]
            else:
                idx = order[sl]
                xb, yb = self.x[idx], self.y[idx]
            if self.augment:
                xb = random_crop(xb, padding=self.crop_padding, generator=g)
                if self._flip_ok:
                    xb = random_flip(xb, generator=g)
                if self.channels_last:  # the crop's gather returns NCHW; give the model NHWC batches
                    xb = xb.contiguous(memory_format=torch.channels_last)
            yield xb, yb


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", f"{name!r} requested but CUDA is not available on this node")
    return dev
