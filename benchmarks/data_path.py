"""Benchmark 4: the data path. sctune's ``DeviceLoader`` vs the usual torchvision ``DataLoader``.

Both serve CIFAR-shaped data (3x32x32, 10 classes, random pixels: the content does not matter for
speed) with the standard augmentation:

* ``DeviceLoader``: the training set as one normalised float tensor; shuffling, random crop (pad 4)
  and horizontal flip as batched tensor ops (``sctune.core.data.DeviceLoader(augment=True)``).
* ``DataLoader(workers=W)``: uint8 HWC images in a small ``Dataset`` whose ``__getitem__`` does what
  ``torchvision.datasets.CIFAR10`` does (``PIL.Image.fromarray``) followed by
  ``RandomCrop(32, padding=4), RandomHorizontalFlip(), ToTensor(), Normalize(mean, std)``; batch 128,
  shuffle, drop_last, W in {0, 2} (W=2 with persistent workers, warmed up by one epoch).

Measured side by side, interleaved per repeat: (1) loader-only samples per wall second and per CPU
second (this process + its loader workers: robust to other jobs on a shared machine) over one epoch; (2) the share
of a ResNet-20 training step (SGD, CPU, 1 torch thread as in a 1-CPU sctune trial) spent waiting for
the next batch: time in ``next()`` / (time in ``next()`` + forward/backward/step).
"""

from __future__ import annotations

import sys
import time
from typing import Any

from benchmarks.common import (
    envelope,
    loadavg,
    log,
    out_dir,
    parser,
    ratio_stats,
    stats,
    tree_cpu_seconds,
    write_result,
)

NAME = "data_path"
FULL = {"n_images": 10_000, "batch_size": 128, "repeats": 3, "train_steps": 8, "workers": [0, 2], "threads": 1}
QUICK = {"n_images": 256, "batch_size": 32, "repeats": 1, "train_steps": 2, "workers": [0, 2], "threads": 1}
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


class UInt8Images:
    """CIFAR10-like dataset: uint8 HWC array + labels, PIL image per item, then the transform."""

    def __init__(self, images, labels, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def make_loaders(conf: dict[str, Any]):
    import numpy as np
    import torch
    from torchvision import transforms as T

    from sctune.core.data import DeviceLoader

    rng = np.random.default_rng(0)
    n, bs = conf["n_images"], conf["batch_size"]
    images = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0 - mean) / std
    y = torch.from_numpy(labels).long()
    loaders = {"DeviceLoader": DeviceLoader(x, y, batch_size=bs, augment=True, seed=0)}
    tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(MEAN, STD)])
    ds = UInt8Images(images, labels, tf)
    for w in conf["workers"]:
        loaders[f"DataLoader(workers={w})"] = torch.utils.data.DataLoader(
            ds, batch_size=bs, shuffle=True, drop_last=True, num_workers=w, persistent_workers=w > 0)
    return loaders


def epoch_rate(loader) -> tuple[float, float]:
    """(samples per wall second, samples per CPU second of this process and its loader workers)."""
    n, c0, t0 = 0, tree_cpu_seconds(), time.perf_counter()
    for xb, _ in loader:
        n += len(xb)
    wall, cpu = time.perf_counter() - t0, tree_cpu_seconds() - c0
    return n / wall, n / max(cpu, 1e-2)


def train_wait_share(loader, steps: int) -> dict[str, float]:
    import torch
    from torch import nn

    from sctune.core.models import build_model

    torch.manual_seed(0)
    model = build_model("resnet20", num_classes=10, input_shape=(3, 32, 32))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    crit = nn.CrossEntropyLoss()
    wait = comp = 0.0
    it = iter(loader)
    for step in range(steps + 1):  # step 0 is a warm-up, not counted
        t0 = time.perf_counter()
        try:
            xb, yb = next(it)
        except StopIteration:
            it = iter(loader)
            xb, yb = next(it)
        t1 = time.perf_counter()
        loss = crit(model(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        t2 = time.perf_counter()
        if step > 0:
            wait += t1 - t0
            comp += t2 - t1
    return {"wait_s": wait, "compute_s": comp, "wait_share": wait / (wait + comp), "steps": steps}


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0])
    args = p.parse_args(argv)
    conf = QUICK if args.quick else FULL
    out = out_dir(args)
    payload = envelope(NAME, args, conf)
    t_start = time.perf_counter()
    import torch

    torch.set_num_threads(conf["threads"])
    loaders = make_loaders(conf)
    for ld in loaders.values():  # warm-up: start persistent workers, first-call costs
        epoch_rate(ld)
    rates: dict[str, list[float]] = {k: [] for k in loaders}
    cpu_rates: dict[str, list[float]] = {k: [] for k in loaders}
    waits: dict[str, list[dict]] = {k: [] for k in loaders}
    loads = []
    names = list(loaders)
    for r in range(conf["repeats"]):
        order = names[r % len(names):] + names[:r % len(names)]
        for k in order:
            rate, cpu_rate = epoch_rate(loaders[k])
            rates[k].append(rate)
            cpu_rates[k].append(cpu_rate)
        for k in order:
            waits[k].append(train_wait_share(loaders[k], conf["train_steps"]))
        loads.append(loadavg())
        log(f"repeat {r}: " + ", ".join(f"{k} {rates[k][-1]:.0f}/s wait {waits[k][-1]['wait_share']:.1%}"
                                        for k in names) + f" (load {loads[-1]})")
    dl = "DeviceLoader"
    payload["results"] = {
        "samples_per_s": {k: stats(v) for k, v in rates.items()},
        "ratio_deviceloader_over": {k: ratio_stats(rates[dl], rates[k]) for k in names if k != dl},
        "samples_per_cpu_s": {k: stats(v) for k, v in cpu_rates.items()},
        "cpu_ratio_deviceloader_over": {k: ratio_stats(cpu_rates[dl], cpu_rates[k]) for k in names if k != dl},
        "resnet20_wait_share": {k: stats([w["wait_share"] for w in v]) for k, v in waits.items()},
        "resnet20_step_s": {k: stats([(w["wait_s"] + w["compute_s"]) / w["steps"] for w in v])
                            for k, v in waits.items()},
        "raw_wait": waits,
        "loadavg_per_repeat": loads,
    }
    payload["wall_s"] = time.perf_counter() - t_start
    payload["loadavg_at_end"] = loadavg()
    path = write_result(out, NAME, payload)
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
