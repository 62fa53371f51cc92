"""data.py: transforms, every --data kind and its errors, the synthetic set, the resumable sampler and loader."""
import json
import os
import pickle
import time
import urllib.error

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import data

LO = [(0 - m) / s for m, s in zip(data.IMAGENET_MEAN, data.IMAGENET_STD)]
HI = [(1 - m) / s for m, s in zip(data.IMAGENET_MEAN, data.IMAGENET_STD)]


def in_range(x):
    return all((x[c] >= LO[c] - 1e-5).all() and (x[c] <= HI[c] + 1e-5).all() for c in range(3))


def rand_img(h, w, seed=0):
    return torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


# -----------------------------------------------------------------------------
# transforms


@pytest.mark.parametrize("size", [32, 224])
@pytest.mark.parametrize("hw", [(32, 32), (40, 56), (300, 250)])
def test_transforms_shape_dtype_range(size, hw):
    img = rand_img(*hw)
    pil = Image.fromarray(img.permute(1, 2, 0).numpy())
    for tf in (data.pretrain_transform(size), data.pretrain_transform(size, (0.2, 1.0), "bicubic"),
               data.finetune_transform(size), data.eval_transform(size)):
        for x in (tf(img), tf(pil)):
            assert type(x) is torch.Tensor and x.dtype == torch.float32 and x.shape == (3, size, size)
            assert torch.isfinite(x).all()
    for tf in (data.pretrain_transform(size), data.eval_transform(size)):  # no erasing noise: stays in range
        assert in_range(tf(img))


def test_small_eval_is_identity_and_denormalize_inverts():
    img = rand_img(32, 32)
    x = data.eval_transform(32)(img)
    assert torch.allclose(data.denormalize(x), img / 255, atol=1e-6)  # no resize, no crop at 32 px
    big = rand_img(224, 224)  # ImageNet path: resize to 256, centre crop 224, so a 224 image is zoomed 8/7
    y = data.denormalize(data.eval_transform(224)(big))
    assert y.shape == (3, 224, 224) and not torch.allclose(y, big / 255, atol=0.1)
    b = data.denormalize(torch.stack([x, x]))
    assert b.shape == (2, 3, 32, 32) and b.min() >= 0 and b.max() <= 1


def test_small_pretrain_is_padded_crop_and_flip():
    # at 32 px the output is a shifted (by at most 32 // 8) and maybe flipped copy of the pixels: no resampling
    img = rand_img(32, 32)
    x = data.denormalize(data.pretrain_transform(32, (0.2, 1.0), "bicubic")(img)) * 255
    ref = img.float()
    found = False
    for flip in (ref, ref.flip(2)):
        for dy in range(-4, 5):
            for dx in range(-4, 5):
                a = x[:, max(dy, 0):32 + min(dy, 0), max(dx, 0):32 + min(dx, 0)]
                b = flip[:, max(-dy, 0):32 + min(-dy, 0), max(-dx, 0):32 + min(-dx, 0)]
                found |= torch.allclose(a, b, atol=1e-3)
    assert found


def test_finetune_erasing_and_magnitude():
    img = torch.full((3, 64, 64), 128, dtype=torch.uint8)
    torch.manual_seed(0)
    x = data.finetune_transform(64, randaug_magnitude=0, reprob=1.0)(img)  # m0: RandAugment ops are no-ops
    assert not in_range(x)  # per-pixel N(0, 1) noise ('pixel' mode) leaves the range of a real image
    assert in_range(data.finetune_transform(64, randaug_magnitude=0, reprob=0.0)(img))
    with pytest.raises(ValueError, match="0..10"):
        data.finetune_transform(32, randaug_magnitude=11)
    tf, x = data.finetune_transform(32), data.synthetic_image(0)[0]
    for seed in range(40):  # 80 draws of the 14 RandAugment ops on a uint8 tensor: each op ~4 times
        torch.manual_seed(seed)
        assert torch.isfinite(tf(x)).all()


# -----------------------------------------------------------------------------
# synthetic


def test_synthetic_deterministic_any_size():
    a = data.build_dataset("synthetic", "train", None, img_size=32, seed=0)
    b = data.build_dataset("synthetic", "train", None, img_size=32, seed=0)
    assert len(a) == 10000 and len(data.build_dataset("synthetic", "val", None)) == 2000
    assert a.num_classes == 10 and a.classes == list(data.SHAPES) and a.classes[:3] == ["circle", "square", "triangle"]
    x, y = a[7]
    assert x.dtype == torch.uint8 and x.shape == (3, 32, 32) and y == 7
    assert torch.equal(x, b[7][0])
    assert not torch.equal(x, data.build_dataset("synthetic", "train", None, img_size=32, seed=1)[7][0])
    assert not torch.equal(x, data.build_dataset("synthetic", "test", None, img_size=32, seed=0)[7][0])
    assert not torch.equal(x, a[8][0])
    for size in (17, 96):
        big = data.build_dataset("synthetic", "train", None, img_size=size, num_images=5)
        assert len(big) == 5 and big[3][0].shape == (3, size, size)
    assert x.float().std() > 20  # a picture, not a flat fill


def test_synthetic_classes_balanced_and_not_colour():
    ds = data.build_dataset("synthetic", "train", None, img_size=32, num_images=1000)
    assert np.bincount(ds.labels).tolist() == [100] * 10
    x = torch.stack([ds[i][0] for i in range(len(ds))]).float()
    y = torch.tensor(ds.labels)
    feats = torch.cat([x.mean((2, 3)), x.std((2, 3))], 1)  # mean colour and contrast
    centroids = torch.stack([feats[:600][y[:600] == c].mean(0) for c in range(10)])
    acc = (torch.cdist(feats[600:], centroids).argmin(1) == y[600:]).float().mean()
    assert acc < 0.2  # chance is 0.1; only shape identifies the class


# -----------------------------------------------------------------------------
# folders, .npz, torchvision


def write_png(path, h=20, w=24, seed=0):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(rand_img(h, w, seed).permute(1, 2, 0).numpy()).save(path)


def test_image_folder_flat_and_split(tmp_path):
    flat = tmp_path / "flat"
    write_png(flat / "cat" / "a.png", seed=1)
    write_png(flat / "cat" / "sub" / "b.PNG", seed=2)  # nested, upper-case extension
    write_png(flat / "dog" / "c.png", seed=3)
    (flat / "dog" / "notes.txt").write_text("not an image")
    os.makedirs(flat / "empty_class")  # a class without images is fine
    ds = data.build_dataset(str(flat), "train", data.eval_transform(32))
    assert len(ds) == 3 and ds.classes == ["cat", "dog", "empty_class"] and ds.num_classes == 3
    assert ds.labels == [0, 0, 1]
    x, y = ds[2]
    assert x.shape == (3, 32, 32) and y == 1
    assert len(data.build_dataset(str(flat), "val", None)) == 3  # a flat folder serves both splits
    raw = data.build_dataset(str(flat), "train", None)[0][0]
    assert raw.dtype == torch.uint8 and raw.shape == (3, 20, 24)

    split = tmp_path / "split"
    for c in ("a", "b"):
        write_png(split / "train" / c / "1.png")
        write_png(split / "train" / c / "2.png")
    write_png(split / "val" / "b" / "1.png")  # val lacks class 'a': labels still follow train/
    tr = data.build_dataset(str(split), "train", None)
    va = data.build_dataset(str(split), "val", None)
    assert len(tr) == 4 and len(va) == 1 and va.classes == ["a", "b"] and va.labels == [1]
    write_png(split / "val" / "zebra" / "1.png")
    with pytest.raises(ValueError, match="'zebra' is not one of the 2 training classes"):
        data.build_dataset(str(split), "val", None)
    write_png(tmp_path / "noval" / "train" / "a" / "1.png")
    with pytest.raises(FileNotFoundError, match="no val/"):
        data.build_dataset(str(tmp_path / "noval"), "test", None)


def test_unreadable_image_is_skipped_with_warning(tmp_path):
    write_png(tmp_path / "a" / "0_good.png", seed=5)
    (tmp_path / "a" / "1_bad.png").write_bytes(b"not a png at all")
    write_png(tmp_path / "a" / "2_good.png", seed=6)
    ds = data.build_dataset(str(tmp_path), "train", None)
    with pytest.warns(UserWarning, match="1_bad.png"):
        x, y = ds[1]
    assert torch.equal(x, ds[2][0]) and y == 0  # the next readable image stands in
    bad = tmp_path / "allbad" / "c"
    os.makedirs(bad)
    (bad / "x.jpg").write_bytes(b"junk")
    with pytest.raises(ValueError, match="none of the 1 image files can be read, e.g. .*x.jpg"):
        data.build_dataset(str(tmp_path / "allbad"), "train", None)  # at once, not inside the training loop


def test_npz_file_and_folder(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "train.npz", images=x, labels=np.arange(6) % 3, class_names=np.array(["a", "b", "c"]))
    np.savez(tmp_path / "test.npz", images=x[:2], labels=np.array([2, 0]))
    ds = data.build_dataset(str(tmp_path), "train", None)
    assert len(ds) == 6 and ds.classes == ["a", "b", "c"] and ds[4][1] == 1
    assert torch.equal(ds[4][0], torch.from_numpy(x[4]).permute(2, 0, 1))  # NHWC in, CHW out
    te = data.build_dataset(str(tmp_path), "test", data.eval_transform(32))
    assert len(te) == 2 and te.classes == ["0", "1", "2"] and te[0][0].shape == (3, 32, 32)
    one = data.build_dataset(str(tmp_path / "train.npz"), "val", None)  # a single file serves both splits
    assert len(one) == 6
    sub = data.build_dataset(str(tmp_path / "train.npz"), "train", None, num_images=4, seed=3)
    assert len(sub) == 4 and sub.labels == data.build_dataset(str(tmp_path), "train", None, num_images=4, seed=3).labels
    with pytest.raises(ValueError, match="--num-images 7: .* has only 6 train images"):
        data.build_dataset(str(tmp_path), "train", None, num_images=7)
    with pytest.raises(ValueError, match="--num-images 0: must be at least 1"):
        data.build_dataset("synthetic", "train", None, num_images=0)
    os.remove(tmp_path / "test.npz")
    with pytest.raises(FileNotFoundError, match="no test.npz"):
        data.build_dataset(str(tmp_path), "val", None)


def test_shared_cifar10_npz_if_present():
    path = "/work/shared/data/cifar10"
    if not os.path.isdir(path):
        pytest.skip("shared CIFAR-10 copy not on this machine")
    ds = data.build_dataset(path, "test", data.eval_transform(32), num_images=50)
    assert len(ds) == 50 and ds.classes[0] == "airplane" and ds[0][0].shape == (3, 32, 32)


@pytest.mark.parametrize("arrays, match", [
    (dict(imgs=np.zeros((2, 4, 4, 3), np.uint8), labels=np.zeros(2, int)), r"needs arrays .*it has \['imgs', 'labels'\]"),
    (dict(images=np.zeros((2, 4, 4, 3), np.float32), labels=np.zeros(2, int)), "must be uint8 .* float32"),
    (dict(images=np.zeros((2, 4, 4), np.uint8), labels=np.zeros(2, int)), r"must be uint8 .*\(2, 4, 4\)"),
    (dict(images=np.zeros((2, 4, 4, 3), np.uint8), labels=np.zeros(2, float)), "'labels' must be 2 integers"),
    (dict(images=np.zeros((2, 4, 4, 3), np.uint8), labels=np.zeros(3, int)), "'labels' must be 2 integers"),
])
def test_npz_errors(tmp_path, arrays, match):
    np.savez(tmp_path / "d.npz", **arrays)
    with pytest.raises(ValueError, match=match) as e:
        data.build_dataset(str(tmp_path / "d.npz"), "train", None)
    assert "d.npz" in str(e.value) and "\n" not in str(e.value)


def test_bad_data_arguments(tmp_path):
    cases = [
        (str(tmp_path / "missing"), FileNotFoundError, "no such file or folder"),
        ("imagenet", ValueError, "unknown; valid: synthetic, cifar10"),
        (str(tmp_path / "empty"), ValueError, "empty folder"),
        (str(tmp_path / "noimg"), ValueError, "no images"),
        (str(tmp_path / "loose"), ValueError, "no images"),  # images but no class folders
        (str(tmp_path / "junk.npz"), ValueError, "not a readable .npz"),
        (str(tmp_path / "array.npy"), ValueError, "not a readable .npz"),
    ]
    np.save(tmp_path / "array.npy", np.zeros((2, 4, 4, 3), np.uint8))
    os.makedirs(tmp_path / "empty")
    os.makedirs(tmp_path / "noimg" / "cls")
    (tmp_path / "noimg" / "cls" / "readme.txt").write_text("x")
    write_png(tmp_path / "loose" / "a.png")
    (tmp_path / "junk.npz").write_bytes(b"this is no zip")
    for arg, exc, match in cases:
        with pytest.raises(exc, match=match) as e:
            data.build_dataset(arg, "train", None)
        assert arg in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("name, cls", [("cifar10", "CIFAR10"), ("cifar100", "CIFAR100"), ("stl10", "STL10")])
def test_torchvision_offline_error(tmp_path, monkeypatch, name, cls):
    def offline(self):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(getattr(torchvision.datasets, cls), "download", offline)  # never touches the network
    with pytest.raises(FileNotFoundError) as e:
        data.build_dataset(name, "train", None, data_dir=str(tmp_path))
    msg = str(e.value)
    assert name in msg and str(tmp_path) in msg and "could not be downloaded" in msg and "--data synthetic" in msg


def test_torchvision_fake_cifar10_and_stl10(tmp_path, monkeypatch):
    # Files in torchvision's on-disk formats; the md5 checks are patched, the loading code is torchvision's.
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a: True)
    base = tmp_path / "cifar-10-batches-py"
    os.makedirs(base)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, (2, 3072), dtype=np.uint8), "labels": [1, 9]}
        (base / name).write_bytes(pickle.dumps(batch))
    (base / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))
    ds = data.build_dataset("cifar10", "train", None, data_dir=str(tmp_path))
    assert len(ds) == 10 and ds.num_classes == 10 and ds.labels[:2] == [1, 9]
    first = torch.from_numpy(pickle.loads((base / "data_batch_1").read_bytes())["data"][0].reshape(3, 32, 32))
    assert torch.equal(ds[0][0], first)  # CHW, same pixels
    assert len(data.build_dataset("cifar10", "test", None, data_dir=str(tmp_path))) == 2

    monkeypatch.setattr(torchvision.datasets.STL10, "_check_integrity", lambda self: True)
    base = tmp_path / "stl10_binary"
    os.makedirs(base)
    (base / "test_X.bin").write_bytes(rng.integers(0, 256, 3 * 3 * 96 * 96, dtype=np.uint8).tobytes())
    (base / "test_y.bin").write_bytes(bytes([1, 2, 10]))  # 1-based on disk
    (base / "class_names.txt").write_text("\n".join(f"s{i}" for i in range(10)))
    ds = data.build_dataset("stl10", "test", data.eval_transform(32), data_dir=str(tmp_path))
    assert len(ds) == 3 and ds.labels == [0, 1, 9] and ds.classes[9] == "s9" and ds[0][0].shape == (3, 32, 32)
    assert data.build_dataset("stl10", "test", None, data_dir=str(tmp_path))[0][0].shape == (3, 96, 96)


# -----------------------------------------------------------------------------
# sampler and loader


def order(sampler, epoch, skip=0):
    sampler.set_epoch(epoch, skip)
    return list(sampler)


def test_sampler_epochs_skip_and_eval():
    s = data.EpochSampler(100, 8, shuffle=True, drop_last=True, seed=0)
    e0, e1 = order(s, 0), order(s, 1)
    assert len(s) == 100 and sorted(i for i, _ in e0) == list(range(100))
    assert [i for i, _ in e0] != [i for i, _ in e1] and e0 == order(s, 0)
    assert order(s, 1, skip=3) == e1[24:] and len(s) == 100  # the tail of the same order, same seeds
    seeds = dict(e0)
    assert len(set(seeds.values())) == 100 and dict(e1)[5] != seeds[5]  # a seed per (epoch, index)
    assert order(data.EpochSampler(100, 8, True, True, seed=1), 0) != e0
    ev = data.EpochSampler(10, 4, shuffle=False, drop_last=False)
    assert [i for i, _ in order(ev, 0)] == list(range(10)) and [i for i, _ in order(ev, 0, skip=2)] == [8, 9]


@pytest.mark.parametrize("n, world", [(10, 3), (11, 2), (4, 4)])
def test_sampler_shards(n, world):
    train = [[i for i, _ in order(data.EpochSampler(n, 1, True, True, 0, r, world), 2)] for r in range(world)]
    flat = sum(train, [])
    assert len(set(flat)) == len(flat) == n - n % world and all(len(t) == n // world for t in train)
    padded = [[i for i, _ in order(data.EpochSampler(n, 1, True, False, 0, r, world), 2)] for r in range(world)]
    assert set(sum(padded, [])) == set(range(n)) and all(len(t) == -(-n // world) for t in padded)
    ev = [[i for i, _ in order(data.EpochSampler(n, 1, False, False, 0, r, world), 0)] for r in range(world)]
    assert sorted(sum(ev, [])) == list(range(n))  # exact: no padding, no duplicates
    # a sample's seed does not depend on the world size: same augmentation on 1 or N processes
    one = dict(order(data.EpochSampler(n, 1, True, True, 0, 0, 1), 2))
    assert all(one[i] == s for r in range(world) for i, s in order(data.EpochSampler(n, 1, True, True, 0, r, world), 2))


def batches(loader, epoch, skip=0):
    loader.sampler.set_epoch(epoch, skip)
    return [(x.clone(), y.clone()) for x, y in loader]


def test_loader_resume_workers_and_rng():
    ds = data.build_dataset("synthetic", "train", data.pretrain_transform(32), img_size=32, num_images=40)
    loader = data.build_loader(ds, 8, train=True, workers=0, seed=0)
    assert len(loader) == 5 and loader.drop_last and not loader.persistent_workers
    state = torch.get_rng_state()
    full = batches(loader, 3)
    assert torch.equal(state, torch.get_rng_state())  # the main process RNG is untouched
    tail = batches(loader, 3, skip=2)
    assert len(loader) == 5 and len(tail) == 3
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(full[2:], tail))
    assert not torch.equal(full[0][0], batches(loader, 4)[0][0])
    par = data.build_loader(ds, 8, train=True, workers=2, seed=0)
    assert par.persistent_workers
    same = batches(par, 3)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(full, same))
    again = batches(par, 3, skip=4)  # persistent workers, new epoch state
    assert len(again) == 1 and torch.equal(again[0][0], full[4][0])


def test_loader_eval_and_errors():
    ds = data.build_dataset("synthetic", "val", data.eval_transform(32), img_size=32, num_images=10)
    loader = data.build_loader(ds, 4, train=False, workers=0)
    out = batches(loader, 0)
    assert len(loader) == 3 and [len(y) for _, y in out] == [4, 4, 2]
    assert torch.cat([y for _, y in out]).tolist() == ds.labels  # in order, nothing dropped
    assert len(data.build_loader(ds, 4, train=True, workers=0, drop_last=False)) == 3
    with pytest.raises(ValueError, match="--batch-size 16"):
        data.build_loader(ds, 16, train=True, workers=0)


def shard_worker(rank, out):
    # forked: data and torch are already imported, so this costs a second, not two interpreter start-ups
    torch.distributed.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank, world_size=2)
    for split, n in (("train", 21), ("val", 11)):
        ds = data.build_dataset("synthetic", split, None, img_size=8, num_images=n)
        loader = data.build_loader(ds, 2, train=split == "train", workers=0)
        loader.sampler.set_epoch(1)
        seen = [i for i, _ in loader.sampler]
        labels = sum(len(y) for _, y in loader)
        with open(os.path.join(out, f"{split}{rank}.json"), "w") as f:
            json.dump({"indices": seen, "batches": len(loader), "labels": labels}, f)

    def slow_offline_download(self):  # rank 0 tries first, alone; the other rank waits for it
        with open(os.path.join(out, "downloads.txt"), "a") as f:
            f.write(f"{rank} {time.time()}\n")
        time.sleep(0.3)
        raise urllib.error.URLError("no network")

    torchvision.datasets.CIFAR10.download = slow_offline_download  # a forked process: patched here only
    try:
        data.build_dataset("cifar10", "train", None, data_dir=os.path.join(out, "cifar"))
    except FileNotFoundError:
        pass
    torch.distributed.destroy_process_group()


def test_two_process_gloo_shards(tmp_path):
    torch.multiprocessing.start_processes(shard_worker, (str(tmp_path),), nprocs=2, start_method="fork")
    for split, n in (("train", 21), ("val", 11)):
        r = [json.loads((tmp_path / f"{split}{k}.json").read_text()) for k in range(2)]
        a, b = r[0]["indices"], r[1]["indices"]
        assert not set(a) & set(b)
        if split == "train":  # DistributedSampler-like: equal shards, 21 -> 2 x 10, one image dropped
            assert len(a) == len(b) == 10 and r[0]["batches"] == r[1]["batches"] == 5
        else:  # eval: strided, exact union
            assert sorted(a + b) == list(range(n)) and r[0]["labels"] + r[1]["labels"] == n
    tries = sorted((float(t), int(k)) for k, t in (line.split() for line in (tmp_path / "downloads.txt").open()))
    assert [k for _, k in tries] == [0, 1] and tries[1][0] - tries[0][0] >= 0.3  # no two ranks download at once


# ---- the device path: batched augmentation of in-memory images ------------------------------------------------------

def memory_dataset(tmp_path, n=64, size=32, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    np.savez(tmp_path / "mem.npz", images=x, labels=np.arange(n) % 4)
    return str(tmp_path / "mem.npz")


@pytest.mark.parametrize("img_size", [32, 96])
def test_device_loader_is_used_for_memory_data_and_crops_per_sample(tmp_path, img_size):
    path = memory_dataset(tmp_path)
    ds = data.build_dataset(path, "train", data.pretrain_transform(img_size, scale=(0.2, 1.0)))
    loader = data.build_loader(ds, 16, train=True, workers=0, device="cpu")
    assert isinstance(loader, data.DeviceLoader) and len(loader) == 4
    loader.sampler.set_epoch(0)
    x, y = next(iter(loader))
    assert x.shape == (16, 3, img_size, img_size) and x.dtype == torch.float32 and y.shape == (16,)
    same = data.build_dataset(path, "train", data.pretrain_transform(img_size)).source[0:1].expand(16, -1, -1, -1)
    g = torch.Generator().manual_seed(0)
    out = ds.transform.batched(same.contiguous(), g)  # one image 16 times: 16 different crops
    assert len({tuple(o.flatten()[:64].tolist()) for o in out}) > 8
    eval_loader = data.build_loader(data.build_dataset(path, "val", data.eval_transform(32)), 16, train=False,
                                    workers=0, device="cpu")
    assert not isinstance(eval_loader, data.DeviceLoader)  # evaluation keeps the plain loader


def test_rrc_boxes_follow_torchvision_and_stay_inside():
    g = torch.Generator().manual_seed(0)
    top, left, h, w = data.rrc_boxes(20000, 48, 64, (0.2, 1.0), (3 / 4, 4 / 3), g, "cpu")
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 48).all() and (left + w <= 64).all()
    torch.manual_seed(0)
    ref = torch.tensor([data.T.RandomResizedCrop.get_params(torch.zeros(3, 48, 64), [0.2, 1.0], [3 / 4, 4 / 3])
                        for _ in range(20000)], dtype=torch.float)  # (n, 4): i, j, h, w
    ours = torch.stack([top, left, h, w], 1).float()
    torch.testing.assert_close(ours.mean(0), ref.mean(0), rtol=0.02, atol=0.3)  # same distribution
    torch.testing.assert_close(ours.std(0), ref.std(0), rtol=0.03, atol=0.3)
    top, left, h, w = data.rrc_boxes(100, 10, 100, (0.9, 1.0), (3 / 4, 4 / 3), g, "cpu")  # nothing fits: centre crop
    assert (h == 10).all() and (w == round(10 * 4 / 3)).all() and (left == (100 - 13) // 2).all()


def test_small_image_path_has_the_statistics_of_the_pil_path(tmp_path):
    path = memory_dataset(tmp_path, n=2)
    ds = data.build_dataset(path, "train", data.pretrain_transform(32))
    img = ds.source[:1].expand(4000, -1, -1, -1).contiguous()
    dev = ds.transform.batched(img, torch.Generator().manual_seed(0))  # (4000, 3, 32, 32)
    pil = torch.stack([ds[(0, s)][0] for s in range(4000)])  # per-image v2 transforms, seeded per sample
    torch.testing.assert_close(dev.mean(0), pil.mean(0), atol=0.13, rtol=0)  # per-pixel mean: 5.5 standard errors
    torch.testing.assert_close(dev.std(0), pil.std(0), atol=0.13, rtol=0)
    flipped = (dev[:, :, :, 8:24] == dev.flip(-1)[:, :, :, 8:24]).all((1, 2, 3))  # never, for a random image
    assert not flipped.any()
    centre = ds.transform.batched(torch.zeros(1, 3, 32, 32, dtype=torch.uint8).repeat(5000, 1, 1, 1).index_fill_(
        3, torch.arange(16), 255), torch.Generator().manual_seed(1))  # left half white: the flip shows
    left_white = (centre[:, 0, 16, 4] > 0).float().mean()
    assert abs(left_white - 0.5) < 0.03  # horizontal flip with probability 1/2


def test_device_loader_resumes_exactly_and_shards(tmp_path):
    path = memory_dataset(tmp_path)
    ds = data.build_dataset(path, "train", data.pretrain_transform(32))
    loader = data.build_loader(ds, 8, train=True, workers=0, seed=3, device="cpu")
    loader.sampler.set_epoch(2)
    full = list(loader)
    loader.sampler.set_epoch(2, skip_batches=5)
    rest = list(loader)
    assert len(rest) == 3
    for (a, ya), (b, yb) in zip(full[5:], rest):
        assert torch.equal(a, b) and torch.equal(ya, yb)  # the same batches, the same augmentation
    loader.sampler.set_epoch(3)
    assert not torch.equal(next(iter(loader))[0], full[0][0])  # a new epoch draws anew
    shards = [data.DeviceLoader(ds, 8, data.EpochSampler(len(ds), 8, True, True, 3, r, 2), torch.device("cpu"), 3)
              for r in range(2)]
    seen = []
    for s in shards:
        s.sampler.set_epoch(2)
        seen += [y for _, ys in s for y in ys.tolist()]
    assert len(seen) == 64  # two ranks share the epoch
