"""sctune.core.data: built-in datasets, seeded stratified splits, CIFAR through torchvision's own loader,
the device-resident loader and its batched augmentation."""

import hashlib
import pickle
from collections import Counter

import numpy as np
import pytest
import torch
from torchvision import datasets as tv_datasets

from sctune.core import data as data_mod
from sctune.core.config import ConfigError, TaskConfig
from sctune.core.data import (
    DeviceLoader,
    load_dataset,
    make_synthetic,
    random_crop,
    random_flip,
    register_dataset,
    resolve_device,
)
from sctune.core.tasks import DATASETS


@pytest.fixture
def registry(monkeypatch):
    """A private copy of the dataset registry, so registering in a test leaks nowhere."""
    monkeypatch.setattr(DATASETS, "entries", dict(DATASETS.entries))
    return DATASETS.entries


def _indexed(task: TaskConfig):
    """380 train+val samples whose single feature is their index; imbalanced classes (20 + 4c each)."""
    counts = [20 + 4 * c for c in range(10)]
    y = torch.cat([torch.full((n,), c, dtype=torch.long) for c, n in enumerate(counts)])
    y = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(5))]
    x = torch.arange(len(y), dtype=torch.float32).view(-1, 1, 1)
    return x, y, -torch.ones(7, 1, 1), torch.zeros(7, dtype=torch.long), 10, False


def _ids(t: torch.Tensor) -> list[int]:
    return [int(v) for v in t.view(-1)]


# -- built-ins ----------------------------------------------------------------------------------

def test_digits_shapes_and_sizes():
    d = load_dataset(TaskConfig(dataset="digits"))
    assert d.input_shape == (1, 8, 8) and d.num_classes == 10 and d.augment is False
    sizes = d.sizes()
    assert sizes["test"] == 360 and sizes["train"] + sizes["val"] == 1797 - 360
    assert sizes["val"] == pytest.approx(0.15 * 1437, abs=1)
    assert d.x_train.dtype == torch.float32 and d.y_train.dtype == torch.int64
    assert set(d.y_train.tolist()) == set(range(10)) and set(d.y_test.tolist()) == set(range(10))
    assert abs(float(d.x_train.mean())) < 0.5 and 0.5 < float(d.x_train.std()) < 1.5  # normalised


def test_mnist1d_shapes():
    d = load_dataset(TaskConfig(dataset="mnist1d", model="mnist1d_cnn"))
    assert d.input_shape == (1, 40) and d.num_classes == 10
    assert d.sizes()["train"] + d.sizes()["val"] == 4000 and d.sizes()["test"] == 1000
    assert d.augment is False


def test_synthetic_shapes_and_seeded():
    a = load_dataset(TaskConfig(dataset="synthetic"))
    assert a.input_shape == (1, 8, 8) and a.sizes()["train"] + a.sizes()["val"] == 2000
    assert a.sizes()["test"] == 500
    b = load_dataset(TaskConfig(dataset="synthetic"))
    assert torch.equal(a.x_train, b.x_train)
    c = load_dataset(TaskConfig(dataset="synthetic", data_seed=1))
    assert not torch.equal(a.x_test, c.x_test)


def test_make_synthetic_is_learnable_prototypes():
    x, y, xt, yt = make_synthetic(n_train=300, n_test=100, shape=(3, 4, 4), num_classes=3, seed=0, noise=0.1)
    assert x.shape == (300, 3, 4, 4) and xt.shape == (100, 3, 4, 4) and y.shape == (300,)
    # low noise: nearest class mean classifies the test set perfectly
    means = torch.stack([x[y == c].mean(0) for c in range(3)]).flatten(1)
    pred = torch.cdist(xt.flatten(1), means).argmin(1)
    assert torch.equal(pred, yt)


def test_unknown_dataset():
    with pytest.raises(ConfigError) as info:
        load_dataset(TaskConfig(dataset="imagenet-tiny"))
    assert info.value.path == "task.dataset" and "digits" in str(info.value)


# -- splits -------------------------------------------------------------------------------------

def test_split_disjoint_complete_and_stratified(registry):
    register_dataset("indexed", _indexed)
    d = load_dataset(TaskConfig(dataset="indexed", val_frac=0.2))
    tr, va = _ids(d.x_train), _ids(d.x_val)
    assert not set(tr) & set(va)
    assert sorted(tr + va) == list(range(380))
    x_all, y_all, *_ = _indexed(TaskConfig())
    assert torch.equal(d.y_train, y_all[torch.tensor(tr)])  # labels travel with their samples
    per_class = Counter(y_all.tolist())
    val_counts = Counter(d.y_val.tolist())
    for c, n in per_class.items():
        assert abs(val_counts[c] - 0.2 * n) <= 1, (c, val_counts[c], n)
    assert _ids(d.x_test) == [-1] * 7  # the test split is passed through untouched


def test_same_data_seed_same_split(registry):
    register_dataset("indexed", _indexed)
    a = load_dataset(TaskConfig(dataset="indexed", data_seed=3))
    b = load_dataset(TaskConfig(dataset="indexed", data_seed=3))
    c = load_dataset(TaskConfig(dataset="indexed", data_seed=4))
    assert _ids(a.x_val) == _ids(b.x_val)
    assert _ids(a.x_val) != _ids(c.x_val)


def test_train_subset(registry):
    register_dataset("indexed", _indexed)
    full = load_dataset(TaskConfig(dataset="indexed"))
    sub = load_dataset(TaskConfig(dataset="indexed", train_subset=100))
    again = load_dataset(TaskConfig(dataset="indexed", train_subset=100))
    assert len(sub.y_train) == 100
    assert set(_ids(sub.x_train)) <= set(_ids(full.x_train))  # never from the validation split
    assert _ids(sub.x_val) == _ids(full.x_val)  # val unchanged by the subset
    assert _ids(sub.x_train) == _ids(again.x_train)
    with pytest.raises(ConfigError) as info:
        load_dataset(TaskConfig(dataset="indexed", train_subset=10_000))
    assert info.value.path == "task.train_subset"


def test_register_dataset_and_duplicates(registry):
    @register_dataset("indexed")
    def fn(task):
        return _indexed(task)

    assert "indexed" in DATASETS.names()
    with pytest.raises(ValueError, match="already registered"):
        register_dataset("indexed", _indexed)
    with pytest.raises(ValueError, match="already registered"):
        register_dataset("digits", _indexed)
    register_dataset("indexed", lambda task: _indexed(task)[:5] + (True,), overwrite=True)
    assert load_dataset(TaskConfig(dataset="indexed")).augment is True
    assert load_dataset(TaskConfig(dataset="indexed", augment=False)).augment is False


# -- CIFAR through torchvision's loader ---------------------------------------------------------

def _md5(path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _write_pickle(path, obj) -> str:
    # Keys as str: torchvision unpickles the real (Python 2) files with encoding="latin1", which turns
    # their byte-string keys into these same str keys.
    path.write_bytes(pickle.dumps(obj, protocol=2))
    return _md5(path)


def _raw_images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 3072), dtype=np.uint8)


def _fake_cifar10(root, monkeypatch, *, per_batch=40):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    train_list = []
    for i in range(1, 6):
        labels = [int(v) for v in np.arange(per_batch) % 10]
        md5 = _write_pickle(folder / f"data_batch_{i}",
                            {"batch_label": f"training batch {i} of 5", "labels": labels,
                             "data": _raw_images(per_batch, i), "filenames": [f"{i}_{j}.png" for j in range(per_batch)]})
        train_list.append([f"data_batch_{i}", md5])
    test_raw = _raw_images(30, 99)
    test_labels = [int(v) for v in (np.arange(30) * 7) % 10]
    test_md5 = _write_pickle(folder / "test_batch", {"batch_label": "testing batch 1 of 1", "labels": test_labels,
                                                     "data": test_raw, "filenames": ["t.png"] * 30})
    meta_md5 = _write_pickle(folder / "batches.meta", {"label_names": [f"class{c}" for c in range(10)],
                                                       "num_cases_per_batch": per_batch, "num_vis": 3072})
    # torchvision verifies each file's md5 against the real archive's; point it at our files' md5s
    # (still checked), everything else is torchvision's own loading path.
    monkeypatch.setattr(tv_datasets.CIFAR10, "train_list", train_list)
    monkeypatch.setattr(tv_datasets.CIFAR10, "test_list", [["test_batch", test_md5]])
    monkeypatch.setattr(tv_datasets.CIFAR10, "meta", {"filename": "batches.meta", "key": "label_names",
                                                      "md5": meta_md5})
    return test_raw, test_labels


def _expected(raw: np.ndarray, name: str) -> torch.Tensor:
    mean = torch.tensor(data_mod.CIFAR_STATS[name][0]).view(1, 3, 1, 1)
    std = torch.tensor(data_mod.CIFAR_STATS[name][1]).view(1, 3, 1, 1)
    x = torch.from_numpy(raw.copy()).view(-1, 3, 32, 32).float() / 255.0  # CIFAR rows: R plane, G, B
    return (x - mean) / std


def test_cifar10_real_loader(tmp_path, monkeypatch):
    test_raw, test_labels = _fake_cifar10(tmp_path, monkeypatch)
    d = load_dataset(TaskConfig(dataset="cifar10", model="resnet20", data_root=str(tmp_path)))
    assert d.input_shape == (3, 32, 32) and d.num_classes == 10 and d.augment is True
    assert d.sizes()["train"] + d.sizes()["val"] == 200 and d.sizes()["test"] == 30
    assert d.y_test.tolist() == test_labels
    assert torch.allclose(d.x_test, _expected(test_raw, "cifar10"), atol=1e-6)
    # every train/val image is one of the written training images, channel order intact
    written = _expected(np.concatenate([_raw_images(40, i) for i in range(1, 6)]), "cifar10")
    got = torch.cat([d.x_train, d.x_val])
    match = torch.cdist(got.flatten(1), written.flatten(1)).argmin(1)
    assert torch.allclose(got, written[match], atol=1e-6)
    assert sorted(match.tolist()) == list(range(200))
    assert Counter(torch.cat([d.y_train, d.y_val]).tolist()) == Counter({c: 20 for c in range(10)})


def test_cifar100_real_loader(tmp_path, monkeypatch):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    raw, test_raw = _raw_images(60, 1), _raw_images(10, 2)
    fine = [int(v) for v in np.arange(60) % 5]
    train_md5 = _write_pickle(folder / "train", {"data": raw, "fine_labels": fine,
                                                 "coarse_labels": [0] * 60, "filenames": ["a"] * 60})
    test_md5 = _write_pickle(folder / "test", {"data": test_raw, "fine_labels": [4] * 10,
                                               "coarse_labels": [0] * 10, "filenames": ["b"] * 10})
    meta_md5 = _write_pickle(folder / "meta", {"fine_label_names": [f"f{c}" for c in range(100)],
                                               "coarse_label_names": [f"c{c}" for c in range(20)]})
    monkeypatch.setattr(tv_datasets.CIFAR100, "train_list", [["train", train_md5]])
    monkeypatch.setattr(tv_datasets.CIFAR100, "test_list", [["test", test_md5]])
    monkeypatch.setattr(tv_datasets.CIFAR100, "meta", {"filename": "meta", "key": "fine_label_names",
                                                       "md5": meta_md5})
    d = load_dataset(TaskConfig(dataset="cifar100", model="resnet20", data_root=str(tmp_path)))
    assert d.num_classes == 100 and d.input_shape == (3, 32, 32)
    assert d.y_test.tolist() == [4] * 10
    assert torch.allclose(d.x_test, _expected(test_raw, "cifar100"), atol=1e-6)
    assert sorted(torch.cat([d.y_train, d.y_val]).tolist()) == sorted(fine)


def test_cifar_missing_gives_config_error(tmp_path):
    for name in ("cifar10", "cifar100"):
        with pytest.raises(ConfigError) as info:
            load_dataset(TaskConfig(dataset=name, data_root=str(tmp_path / "nothing")))
        assert info.value.path == "task.data_root"
        assert "download" in str(info.value) and str(tmp_path / "nothing") in str(info.value)


def test_cifar_corrupted_gives_config_error(tmp_path, monkeypatch):
    _fake_cifar10(tmp_path, monkeypatch)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"truncated")
    with pytest.raises(ConfigError) as info:
        load_dataset(TaskConfig(dataset="cifar10", data_root=str(tmp_path)))
    assert info.value.path == "task.data_root"


# -- DeviceLoader -------------------------------------------------------------------------------

def _loader_data(n=50):
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    return x, torch.arange(n)


def test_loader_covers_permutation_once_per_epoch():
    x, y = _loader_data(50)
    loader = DeviceLoader(x, y, batch_size=8, drop_last=False, seed=1)
    assert len(loader) == 7
    epochs = []
    for _ in range(2):
        seen = []
        for xb, yb in loader:
            assert torch.equal(xb[:, 0, 0, 0].long(), yb)  # x and y stay paired
            seen += yb.tolist()
        assert sorted(seen) == list(range(50))
        epochs.append(seen)
    assert epochs[0] != epochs[1] and epochs[0] != list(range(50))  # reshuffled every epoch


def test_loader_drop_last_and_no_shuffle():
    x, y = _loader_data(50)
    loader = DeviceLoader(x, y, batch_size=8, seed=1)  # drop_last by default
    assert len(loader) == 6
    seen = [v for _, yb in loader for v in yb.tolist()]
    assert len(seen) == 48 and len(set(seen)) == 48
    plain = DeviceLoader(x, y, batch_size=8, shuffle=False, drop_last=False)
    assert [v for _, yb in plain for v in yb.tolist()] == list(range(50))
    assert len(DeviceLoader(x, y, batch_size=500)) == 1  # batch larger than the data: one full batch


def test_loader_reproducible_and_resumable():
    x, y = _loader_data(40)

    def epoch(loader):
        return [yb.tolist() for _, yb in loader]

    a = DeviceLoader(x, y, batch_size=8, seed=7)
    b = DeviceLoader(x, y, batch_size=8, seed=7)
    assert epoch(a) == epoch(b)
    assert epoch(DeviceLoader(x, y, batch_size=8, seed=8)) != epoch(DeviceLoader(x, y, batch_size=8, seed=7))
    epoch(a)
    state = a.state_dict()
    assert state == {"epoch": 2, "seed": 7}
    next_a = epoch(a)
    c = DeviceLoader(x, y, batch_size=8, seed=0)
    c.load_state_dict(state)
    assert epoch(c) == next_a


def test_loader_rejects_bad_input():
    with pytest.raises(ValueError):
        DeviceLoader(torch.zeros(3, 1), torch.zeros(4), batch_size=2)
    with pytest.raises(ValueError):
        DeviceLoader(torch.zeros(3, 1), torch.zeros(3), batch_size=0)


def _windows_2d(padded: torch.Tensor, h: int, w: int, p: int):
    return {(dy, dx): padded[:, dy:dy + h, dx:dx + w] for dy in range(2 * p + 1) for dx in range(2 * p + 1)}


def test_random_crop_is_shifted_window_of_padded_input():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 3, 6, 5, generator=g) + 1.0  # positive: zero padding is distinguishable
    out = random_crop(x, padding=2, generator=torch.Generator().manual_seed(3))
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    offsets = set()
    for i in range(len(x)):  # per-sample reference: find the one window the output equals
        hits = [off for off, win in _windows_2d(padded[i], 6, 5, 2).items() if torch.equal(out[i], win)]
        assert len(hits) == 1, i
        offsets.add(hits[0])
    assert len(offsets) > 10  # offsets are per sample, not one for the batch
    assert {dy for dy, _ in offsets} == set(range(5)) and {dx for _, dx in offsets} == set(range(5))
    again = random_crop(x, padding=2, generator=torch.Generator().manual_seed(3))
    assert torch.equal(out, again)
    assert random_crop(x, padding=0) is x


def test_random_crop_1d():
    x = torch.rand(32, 2, 10) + 1.0
    out = random_crop(x, padding=3, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (3, 3))
    shifts = set()
    for i in range(32):
        hits = [s for s in range(7) if torch.equal(out[i], padded[i, :, s:s + 10])]
        assert len(hits) == 1
        shifts.add(hits[0])
    assert len(shifts) > 3


def test_random_flip_flips_exactly_the_masked_samples():
    x = torch.rand(200, 3, 4, 4)
    out = random_flip(x, generator=torch.Generator().manual_seed(11))
    mask = torch.rand((200,), generator=torch.Generator().manual_seed(11)) < 0.5  # the same draw
    assert torch.equal(out[mask], x[mask].flip(-1))
    assert torch.equal(out[~mask], x[~mask])
    assert 60 < int(mask.sum()) < 140
    assert not torch.equal(x.flip(-1), x)  # the check above is not vacuous


def test_loader_augments_2d_and_never_flips_1d():
    n = 64
    ramp = torch.arange(6, dtype=torch.float32)
    x2 = ramp.view(1, 1, 1, 6).expand(n, 1, 3, 6).contiguous()
    x1 = ramp.view(1, 1, 6).expand(n, 1, 6).contiguous()
    y = torch.arange(n)
    flipped = 0
    for xb, _ in DeviceLoader(x2, y, batch_size=16, augment=True, crop_padding=0, seed=0):
        for s in xb:
            assert torch.equal(s, x2[0]) or torch.equal(s, x2[0].flip(-1))
            flipped += int(torch.equal(s, x2[0].flip(-1)))
    assert 10 < flipped < 54
    for xb, _ in DeviceLoader(x1, y, batch_size=16, augment=True, crop_padding=0, seed=0):
        assert torch.equal(xb, x1[: len(xb)])  # 1-D signals: no flip
    shifted = sum(not torch.equal(s, x2[0]) and not torch.equal(s, x2[0].flip(-1))
                  for xb, _ in DeviceLoader(x2, y, batch_size=16, augment=True, crop_padding=2, seed=0) for s in xb)
    assert shifted > 0
    plain = [xb for xb, _ in DeviceLoader(x2, y, batch_size=16, augment=False, seed=0)]
    assert all(torch.equal(xb, x2[:16]) for xb in plain)


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError) as info:
            resolve_device("cuda")
        assert info.value.path == "device"
