"""Tests of scan_dist.data.datasets: tiny datasets written in each real on-disk format."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from scan_dist.data import formats
from scan_dist.data.formats import arrays as ds
from scan_dist.data.formats import common
from scan_dist.data.formats import BadImage, detect_format, fashion_mnist_dir
from scan_dist.data.transforms import ViewTransform
from scan_dist.data.augment import AugmentConfig
from scan_dist.errors import ConfigError, DataError

SUBSET_DIR = Path(formats.__file__).parent.parent / "imagenet_subsets"
FAST = {}


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Each test decodes arrays into its own cache folder."""
    monkeypatch.setenv("SCAN_DIST_CACHE_DIR", str(tmp_path / ".array-cache"))


def open_dataset(path, split, **kw):
    """The reader; image files resized so the shorter side is image_size (then the eval crop is the whole
    shorter side: the old load-time geometry), unless a test asks for another resize_size."""
    if kw.get("image_size") is not None:
        kw.setdefault("resize_size", kw["image_size"])
    return formats.open_dataset(path, split, **kw)


def images_of(reader) -> torch.Tensor:
    """uint8 [N, C, S, S]: every image's un-augmented network-size crop (the eval view before normalising)."""
    view = ViewTransform("eval", AugmentConfig(), [0.0] * reader.channels, [1.0] * reader.channels,
                         reader.image_size)
    if reader.fixed_size:
        return reader.read_batch(np.arange(len(reader)))
    stored = [reader.read(i) for i in range(len(reader))]
    params = view.params(None, np.array([img.shape[-2:] for img in stored]))
    return torch.stack([view.base_one(img, params, i) for i, img in enumerate(stored)])


def names_of(reader):
    return None if reader.names is None else [name.decode() for name in reader.names]


# ---- builders -------------------------------------------------------------------------------


def idx_bytes(array: np.ndarray, magic_type: int = 0x08) -> bytes:
    header = bytes([0, 0, magic_type, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_file(path: Path, data: bytes, gz: bool) -> Path:
    if gz:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


def make_idx(root: Path, n_train: int = 6, n_test: int = 4) -> dict[str, np.ndarray]:
    """Train split gzipped, eval split raw, so both encodings are exercised."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    arrays = {}
    for prefix, n, gz in (("train", n_train, True), ("t10k", n_test, False)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) * 3 % 10).astype(np.uint8)
        write_file(root / f"{prefix}-images-idx3-ubyte", idx_bytes(images), gz)
        write_file(root / f"{prefix}-labels-idx1-ubyte", idx_bytes(labels), gz)
        arrays[prefix] = (images, labels)
    return arrays


def dump_pickle(path: Path, obj, protocol: int = 2) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)


def make_cifar10(root: Path, with_meta: bool = True) -> dict[str, np.ndarray]:
    """root/cifar-10-batches-py with 5 train batches of 2 images and a test batch of 3."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(2)
    train_data, train_labels = [], []
    for i in range(1, 6):
        data = rng.integers(0, 256, size=(2, 3072), dtype=np.uint8)
        labels = [2 * i - 2, 2 * i - 1]
        dump_pickle(folder / f"data_batch_{i}", {b"data": data, b"labels": labels}, protocol=2 if i % 2 else 4)
        train_data.append(data)
        train_labels += labels
    test = rng.integers(0, 256, size=(3, 3072), dtype=np.uint8)
    dump_pickle(folder / "test_batch", {b"data": test, b"labels": [9, 0, 5]})
    if with_meta:
        names = [f"class{i}".encode() for i in range(10)]
        dump_pickle(folder / "batches.meta", {b"label_names": names})
    return {"train": np.concatenate(train_data), "train_labels": np.array(train_labels), "test": test}


def make_cifar100(root: Path, fine_train, fine_test, coarse_override=None) -> Path:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    table = np.array(ds.CIFAR100_COARSE_OF_FINE)
    rng = np.random.default_rng(3)
    for name, fine in (("train", fine_train), ("test", fine_test)):
        coarse = table[fine].tolist() if coarse_override is None else coarse_override
        batch = {
            b"data": rng.integers(0, 256, size=(len(fine), 3072), dtype=np.uint8),
            b"fine_labels": list(fine),
            b"coarse_labels": coarse,
        }
        dump_pickle(folder / name, batch)
    meta = {
        b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
        b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)],
    }
    dump_pickle(folder / "meta", meta)
    return folder


def stl_pattern(n: int, offset: int = 0) -> np.ndarray:
    """[n,3,96,96] with value depending asymmetrically on row and column."""
    n_idx, c, row, col = np.ogrid[:n, :3, :96, :96]
    return ((row + 7 * col + 50 * c + 13 * (n_idx + offset)) % 256).astype(np.uint8)


def write_stl_images(path: Path, images: np.ndarray) -> None:
    # STL-10 stores every channel column-major (Matlab order): columns are contiguous.
    path.write_bytes(np.ascontiguousarray(images.transpose(0, 1, 3, 2)).tobytes())


def make_stl10(root: Path) -> dict[str, np.ndarray]:
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    train, test, unlabeled = stl_pattern(3), stl_pattern(2, offset=5), stl_pattern(2, offset=9)
    write_stl_images(folder / "train_X.bin", train)
    (folder / "train_y.bin").write_bytes(bytes([1, 10, 4]))
    write_stl_images(folder / "test_X.bin", test)
    (folder / "test_y.bin").write_bytes(bytes([2, 3]))
    write_stl_images(folder / "unlabeled_X.bin", unlabeled)
    (folder / "class_names.txt").write_text("\n".join(f"stl{i}" for i in range(10)) + "\n")
    return {"train": train, "test": test, "unlabeled": unlabeled}


def save_image(path: Path, size=(12, 10), mode="RGB", color=(200, 30, 60)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode in ("L", "LA", "I;16") and isinstance(color, tuple):
        color = color[0]
    if mode == "RGBA" and len(color) == 3:
        color = color + (128,)
    if mode == "LA" and not isinstance(color, tuple):
        color = (color, 255)
    Image.new(mode, size, color).save(path)
    return path


def noise_jpeg(path: Path, size=(64, 64), seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=95)
    return path


def truncate(path: Path, fraction: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


def subset_list(n: int) -> list[tuple[str, str]]:
    lines = (SUBSET_DIR / f"imagenet_{n}.txt").read_text().splitlines()
    return [tuple(line.split(" ", 1)) for line in lines if line.strip()]


@pytest.fixture(scope="module")
def imagenet_root(tmp_path_factory) -> Path:
    """Train folders for all ImageNet-50 wnids plus one extra wnid from ImageNet-100."""
    root = tmp_path_factory.mktemp("imagenet")
    wnids50 = [w for w, _ in subset_list(50)]
    extra = next(w for w, _ in subset_list(100) if w not in wnids50)
    for k, wnid in enumerate(wnids50 + [extra]):
        save_image(root / "train" / wnid / f"{wnid}_{k}.JPEG", size=(10, 8), color=(k * 4, 0, 0))
    # Val as class folders (val/) and flat with LOC_val_solution.csv (flat/val + flat/train link).
    for wnid in (wnids50[3], wnids50[0], extra):
        save_image(root / "val" / wnid / f"val_{wnid}.JPEG", size=(8, 8))
    flat = root / "flat"
    flat.mkdir()
    (flat / "train").symlink_to(root / "train", target_is_directory=True)
    rows = ["ImageId,PredictionString"]
    for i, wnid in enumerate((wnids50[7], wnids50[1], extra)):
        save_image(flat / "val" / f"ILSVRC2012_val_{i:08d}.JPEG", size=(8, 8))
        rows.append(f"ILSVRC2012_val_{i:08d},{wnid} 10 20 30 40 {wnid} 1 2 3 4")
    (flat / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")
    return root


# ---- IDX ---------------------------------------------------------------------------------------


def test_fashion_idx_gzipped_train_and_raw_eval(tmp_path):
    root = tmp_path / "fashion-tiny"
    arrays = make_idx(root)
    assert detect_format(root) == "idx"
    train = open_dataset(root, "train", **FAST)
    assert images_of(train).shape == (6, 1, 28, 28) and images_of(train).dtype == torch.uint8
    assert images_of(train).is_contiguous()
    assert np.array_equal(images_of(train)[:, 0].numpy(), arrays["train"][0])
    assert train.targets.dtype == np.int64 and train.targets.tolist() == arrays["train"][1].tolist()
    assert train.class_names == list(ds.FASHION_MNIST_CLASSES) and train.num_classes == 10
    assert names_of(train) is None and train.fixed_size
    assert train.source == f"idx:{root} (train)"
    test = open_dataset(root, "eval", **FAST)
    assert len(test) == 4 and np.array_equal(images_of(test)[:, 0].numpy(), arrays["t10k"][0])


def test_idx_digit_names_resize_and_channels(tmp_path):
    root = tmp_path / "mnist"
    make_idx(root)
    data = open_dataset(root, "train", image_size=16, channels=3, **FAST)
    assert data.class_names == [str(i) for i in range(10)]
    assert images_of(data).shape == (6, 3, 16, 16)
    assert torch.equal(images_of(data)[:, 0], images_of(data)[:, 2])  # 1 -> 3 replicates


@pytest.mark.parametrize("corruption", ["magic", "truncated", "dims"])
def test_idx_corrupt_header_names_the_file(tmp_path, corruption):
    root = tmp_path / "mnist"
    make_idx(root)
    images = np.zeros((4, 28, 28), np.uint8)
    data = idx_bytes(images)
    if corruption == "magic":
        data = b"\x08\x03\x00\x00" + data[4:]
    elif corruption == "truncated":
        data = data[:-100]
    else:  # images file claiming to be a 1-d label file
        data = idx_bytes(np.zeros(4, np.uint8))
    (root / "t10k-images-idx3-ubyte").write_bytes(data)
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte"):
        open_dataset(root, "eval", **FAST)


def test_idx_label_count_mismatch(tmp_path):
    root = tmp_path / "mnist"
    make_idx(root)
    (root / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(5, np.uint8)))
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.*5 labels.*4 images"):
        open_dataset(root, "eval", **FAST)


def test_idx_not_gzip_names_the_file(tmp_path):
    root = tmp_path / "mnist"
    make_idx(root)
    (root / "train-labels-idx1-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.gz"):
        open_dataset(root, "train", **FAST)


# ---- CIFAR -------------------------------------------------------------------------------------


def test_cifar10_parent_layout_pixels_labels_and_meta(tmp_path):
    arrays = make_cifar10(tmp_path)
    assert detect_format(tmp_path) == "cifar10"
    train = open_dataset(tmp_path, "train", **FAST)
    assert images_of(train).shape == (10, 3, 32, 32)
    # Rows hold the R plane, then G, then B, each row-major.
    assert np.array_equal(images_of(train).numpy(), arrays["train"].reshape(10, 3, 32, 32))
    assert train.targets.tolist() == arrays["train_labels"].tolist()
    assert train.class_names == [f"class{i}" for i in range(10)]
    test = open_dataset(tmp_path, "eval", fmt="cifar10", **FAST)
    assert test.targets.tolist() == [9, 0, 5]
    assert np.array_equal(images_of(test).numpy(), arrays["test"].reshape(3, 3, 32, 32))


def test_cifar10_direct_folder_default_names_and_grayscale(tmp_path):
    arrays = make_cifar10(tmp_path, with_meta=False)
    folder = tmp_path / "cifar-10-batches-py"
    data = open_dataset(folder, "eval", channels=1, **FAST)
    assert data.class_names == list(ds.CIFAR10_CLASSES)
    rgb = arrays["test"].reshape(3, 3, 32, 32)
    expected = np.asarray(Image.fromarray(rgb[0].transpose(1, 2, 0)).convert("L"))
    assert images_of(data).shape == (3, 1, 32, 32)
    assert np.abs(images_of(data)[0, 0].numpy().astype(int) - expected).max() <= 1


def test_cifar_pickle_with_code_is_refused(tmp_path):
    make_cifar10(tmp_path)

    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    dump_pickle(tmp_path / "cifar-10-batches-py" / "test_batch", {b"data": Evil(), b"labels": []})
    with pytest.raises(DataError, match="test_batch"):
        open_dataset(tmp_path, "eval", **FAST)


def test_cifar20_table_matches_spec():
    spec = (
        "4,1,14,8,0,6,7,7,18,3,3,14,9,18,7,11,3,9,7,11,6,11,5,10,7,6,13,15,3,15,0,11,1,10,12,14,16,9,11,5,"
        "5,19,8,8,15,13,14,17,18,10,16,4,17,4,2,0,17,4,18,17,10,3,2,12,12,16,12,1,9,19,2,10,0,1,16,12,9,13,"
        "15,13,16,19,2,4,6,19,5,5,8,19,18,1,2,15,6,0,17,8,14,13"
    )
    table = ds.CIFAR100_COARSE_OF_FINE
    assert list(table) == [int(v) for v in spec.split(",")]
    assert len(table) == 100 and sorted(set(table)) == list(range(20))
    assert all(table.count(c) == 5 for c in range(20))


def test_cifar100_fine_and_cifar20_coarse(tmp_path):
    fine_train, fine_test = [0, 1, 4, 99, 58], [2, 30]
    make_cifar100(tmp_path, fine_train, fine_test)
    assert detect_format(tmp_path) == "cifar20"
    c100 = open_dataset(tmp_path, "train", fmt="cifar100", **FAST)
    assert c100.targets.tolist() == fine_train and c100.num_classes == 100
    assert c100.class_names[99] == "fine99"
    c20 = open_dataset(tmp_path, "train", **FAST)
    assert c20.targets.tolist() == [4, 1, 0, 13, 18]
    assert c20.num_classes == 20 and c20.class_names[4] == "coarse4"
    assert open_dataset(tmp_path, "eval", **FAST).targets.tolist() == [14, 0]
    assert torch.equal(images_of(c20), images_of(c100))


def test_cifar20_coarse_label_mismatch(tmp_path):
    make_cifar100(tmp_path, [0, 1], [2], coarse_override=[4, 2])
    with pytest.raises(DataError, match="coarse_labels"):
        open_dataset(tmp_path, "train", fmt="cifar20", **FAST)


def test_subset_only_for_imagenet(tmp_path):
    make_cifar100(tmp_path, [0], [1])
    with pytest.raises(ConfigError, match="data.subset"):
        open_dataset(tmp_path, "train", subset="imagenet50", **FAST)


# ---- STL-10 ------------------------------------------------------------------------------------


def test_stl10_column_major_layout_labels_and_unlabeled(tmp_path):
    arrays = make_stl10(tmp_path)
    assert detect_format(tmp_path) == "stl10"
    train = open_dataset(tmp_path, "train", **FAST)
    assert images_of(train).shape == (3, 3, 96, 96)
    assert np.array_equal(images_of(train).numpy(), arrays["train"])  # fails without the transpose
    assert train.targets.tolist() == [0, 9, 3]
    assert train.class_names == [f"stl{i}" for i in range(10)]
    both = open_dataset(tmp_path, "train", include_unlabeled=True, **FAST)
    assert len(both) == 5 and both.targets.tolist() == [0, 9, 3, -1, -1]
    assert np.array_equal(images_of(both)[3:].numpy(), arrays["unlabeled"])
    test = open_dataset(tmp_path, "eval", include_unlabeled=True, **FAST)
    assert test.targets.tolist() == [1, 2] and np.array_equal(images_of(test).numpy(), arrays["test"])


def test_stl10_max_images_spans_unlabeled_and_resizes(tmp_path):
    arrays = make_stl10(tmp_path)
    data = open_dataset(tmp_path, "train", include_unlabeled=True, max_images=3, seed=4, image_size=32, **FAST)
    assert images_of(data).shape == (3, 3, 32, 32)
    everything = np.concatenate([arrays["train"], arrays["unlabeled"]])
    keep = np.sort(np.random.default_rng(4).choice(5, 3, replace=False))
    labels = np.array([0, 9, 3, -1, -1])
    assert data.targets.tolist() == labels[keep].tolist()
    full = open_dataset(tmp_path, "train", include_unlabeled=True, image_size=32, **FAST)
    assert torch.equal(images_of(data), images_of(full)[keep])
    assert not np.array_equal(everything[keep][:, :, ::3, ::3], images_of(data).numpy())  # really resized


def test_stl10_bad_file_size(tmp_path):
    make_stl10(tmp_path)
    path = tmp_path / "stl10_binary" / "test_X.bin"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DataError, match="test_X.bin"):
        open_dataset(tmp_path, "eval", **FAST)


# ---- image folders -------------------------------------------------------------------------------


def test_imagefolder_classes_names_modes_and_channels(tmp_path):
    save_image(tmp_path / "dog" / "b.png", size=(20, 10), mode="RGB", color=(255, 0, 0))
    save_image(tmp_path / "dog" / "a.jpg", size=(7, 9), mode="L", color=40)
    save_image(tmp_path / "cat" / "sub" / "x.PNG", size=(16, 16), mode="RGBA", color=(0, 0, 255))
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    assert detect_format(tmp_path) == "imagefolder"
    data = open_dataset(tmp_path, "train", image_size=8, **FAST)
    assert data.class_names == ["cat", "dog"]
    assert names_of(data) == ["cat/sub/x.PNG", "dog/a.jpg", "dog/b.png"]
    assert data.targets.tolist() == [0, 1, 1]
    assert images_of(data).shape == (3, 3, 8, 8)  # one colour image -> every image RGB
    gray = images_of(data)[1]
    assert torch.equal(gray[0], gray[1]) and abs(int(gray[0, 4, 4]) - 40) <= 2
    assert images_of(data)[2, :, 4, 4].tolist() == [255, 0, 0]
    luminance = open_dataset(tmp_path, "train", image_size=8, channels=1, **FAST)
    assert images_of(luminance).shape == (3, 1, 8, 8)
    assert int(images_of(luminance)[2, 0, 4, 4]) == 76  # PIL "L" of pure red
    assert int(images_of(luminance)[0, 0, 4, 4]) == 29  # pure blue, alpha dropped


def test_file_channels_inferred_gray_only_when_all_gray(tmp_path):
    save_image(tmp_path / "a.png", mode="L", color=10)
    save_image(tmp_path / "b.png", mode="LA", color=200)
    wide = np.full((6, 6), 40000, np.uint16)  # 16-bit gray must scale, not clip to 255
    Image.fromarray(wide).save(tmp_path / "c.png")
    assert Image.open(tmp_path / "c.png").mode.startswith("I")
    data = open_dataset(tmp_path, "train", image_size=6, **FAST)
    assert images_of(data).shape == (3, 1, 6, 6)
    assert images_of(data)[:, 0, 3, 3].tolist() == [10, 200, 40000 >> 8]
    palette = Image.new("P", (6, 6), 0)
    palette.putpalette([0, 255, 0] * 256)
    palette.save(tmp_path / "d.gif")
    mixed = open_dataset(tmp_path, "train", image_size=6, **FAST)
    assert images_of(mixed).shape == (4, 3, 6, 6)
    assert images_of(mixed)[3, :, 3, 3].tolist() == [0, 255, 0]
    assert images_of(mixed)[0, :, 3, 3].tolist() == [10, 10, 10]


def test_imagefolder_train_val_layout(tmp_path):
    for cls in ("ant", "bee", "cow"):
        save_image(tmp_path / "train" / cls / "1.png")
    save_image(tmp_path / "val" / "cow" / "1.png")
    save_image(tmp_path / "val" / "ant" / "2.png")
    assert detect_format(tmp_path) == "imagefolder"
    train = open_dataset(tmp_path, "train", image_size=4, **FAST)
    assert names_of(train) == ["train/ant/1.png", "train/bee/1.png", "train/cow/1.png"]
    val = open_dataset(tmp_path, "eval", image_size=4, **FAST)
    assert val.class_names == ["ant", "bee", "cow"]
    assert names_of(val) == ["val/ant/2.png", "val/cow/1.png"] and val.targets.tolist() == [0, 2]
    save_image(tmp_path / "val" / "dog" / "1.png")
    with pytest.raises(DataError, match=r"val.*dog"):
        open_dataset(tmp_path, "eval", image_size=4, **FAST)


def test_imagefolder_eval_falls_back_to_train(tmp_path):
    for cls in ("a", "b"):
        save_image(tmp_path / "train" / cls / "1.png")
    val = open_dataset(tmp_path, "eval", fmt="imagefolder", image_size=4, **FAST)
    assert names_of(val) == ["train/a/1.png", "train/b/1.png"]


def test_flat_folder_recursive_any_size(tmp_path):
    save_image(tmp_path / "z.bmp", size=(30, 5))
    save_image(tmp_path / "deep" / "a.webp", size=(5, 30))
    save_image(tmp_path / ".hidden.png")
    save_image(tmp_path / "m.TIFF", size=(3, 3), mode="L")
    assert detect_format(tmp_path / "deep") == "flat"
    data = open_dataset(tmp_path, "train", fmt="flat", image_size=10, **FAST)
    assert names_of(data) == ["deep/a.webp", "m.TIFF", "z.bmp"]
    assert data.targets is None and data.class_names is None and data.num_classes is None
    assert images_of(data).shape == (3, 3, 10, 10)
    default = open_dataset(tmp_path, "eval", fmt="flat", **FAST)
    assert images_of(default).shape[-1] == common.DEFAULT_FILE_IMAGE_SIZE == 64


@pytest.mark.parametrize("wide", [True, False])
def test_resize_shorter_side_then_center_crop(tmp_path, wide):
    # A 4:1 image whose outer quarters are red/blue and middle half green: scaling the short side
    # to 16 and center-cropping must leave only green (squashing or padding would keep red/blue).
    pixels = np.zeros((40, 160, 3), np.uint8)
    pixels[:, :40] = (255, 0, 0)
    pixels[:, 40:120] = (0, 255, 0)
    pixels[:, 120:] = (0, 0, 255)
    if not wide:
        pixels = pixels.transpose(1, 0, 2)
    Image.fromarray(np.ascontiguousarray(pixels)).save(tmp_path / "img.png")
    data = open_dataset(tmp_path, "train", fmt="flat", image_size=16, **FAST)
    assert images_of(data).shape == (1, 3, 16, 16)
    inner = images_of(data)[0, :, 1:-1, 1:-1]  # one-pixel border may blend with the cropped-off part
    assert int(inner[1].min()) >= 200 and int(inner[0].max()) <= 40 and int(inner[2].max()) <= 40


def test_resize_arrays_match_policy():
    images = np.zeros((1, 1, 8, 16), np.uint8)
    images[..., 2:14] = 255  # dark outer columns: squashing to 4x4 would keep them
    out = ds.resize_arrays(images, 4)
    assert out.shape == (1, 1, 4, 4) and out.min() == 255  # center crop keeps the bright middle


# ---- max_images ----------------------------------------------------------------------------------


def test_max_images_deterministic_sorted_and_consistent(tmp_path):
    for i in range(12):
        save_image(tmp_path / f"c{i % 3}" / f"{i:02d}.png", size=(4, 4), color=(i * 20, 0, 0))
    full = open_dataset(tmp_path, "train", image_size=4, **FAST)
    a = open_dataset(tmp_path, "train", image_size=4, max_images=5, seed=1, **FAST)
    b = open_dataset(tmp_path, "train", image_size=4, max_images=5, seed=1, **FAST)
    c = open_dataset(tmp_path, "train", image_size=4, max_images=5, seed=2, **FAST)
    assert names_of(a) == names_of(b) and len(a) == 5 and names_of(a) != names_of(c)
    keep = [names_of(full).index(n) for n in names_of(a)]
    assert keep == sorted(keep)
    assert a.targets.tolist() == full.targets[keep].tolist()
    assert torch.equal(images_of(a), images_of(full)[keep])
    assert "5 of 12 images" in a.source
    assert len(open_dataset(tmp_path, "train", image_size=4, max_images=99, **FAST)) == 12


def test_max_images_on_arrays(tmp_path):
    root = tmp_path / "mnist"
    arrays = make_idx(root, n_train=20)
    data = open_dataset(root, "train", max_images=7, seed=3, **FAST)
    keep = np.sort(np.random.default_rng(3).choice(20, 7, replace=False))
    assert np.array_equal(images_of(data)[:, 0].numpy(), arrays["train"][0][keep])
    assert data.targets.tolist() == arrays["train"][1][keep].tolist()


# ---- bad images ----------------------------------------------------------------------------------


def test_truncated_jpeg_fail_names_file_and_skip_records_it(tmp_path):
    from PIL import ImageFile

    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    noise_jpeg(tmp_path / "good1.jpg", seed=1)
    noise_jpeg(tmp_path / "good2.jpg", seed=2)
    truncate(noise_jpeg(tmp_path / "broken.jpg", seed=3))
    (tmp_path / "garbage.png").write_bytes(b"\x89PNG not really")
    data = open_dataset(tmp_path, "train", image_size=16, on_bad_image="skip", **FAST)
    # Files are decoded when read (by the loader workers, which apply data.on_bad_image): each bad one names itself.
    assert names_of(data) == ["broken.jpg", "garbage.png", "good1.jpg", "good2.jpg"]
    bad = []
    for i, name in enumerate(names_of(data)):
        try:
            assert data.read(i).shape == (3, 16, 16)
        except BadImage as exc:
            assert name in str(exc)
            bad.append(name)
    assert bad == ["broken.jpg", "garbage.png"]


def test_truncated_jpeg_detected_at_native_size(tmp_path):
    save_image(tmp_path / "ok.png", size=(8, 8))
    truncate(noise_jpeg(tmp_path / "cut.jpg", size=(8, 8)), 0.8)
    with pytest.raises(DataError, match="cut.jpg"):
        open_dataset(tmp_path, "train", image_size=8, **FAST)


def test_all_images_bad_names_folder(tmp_path):
    (tmp_path / "x.jpg").write_bytes(b"not an image")
    (tmp_path / "y.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match=f"{tmp_path}.*readable"):
        open_dataset(tmp_path, "train", fmt="flat", on_bad_image="skip", **FAST)


# ---- ImageNet ------------------------------------------------------------------------------------


def test_imagenet_subset_order_names_and_val_folders(imagenet_root):
    assert detect_format(imagenet_root) == "imagenet"
    listed = subset_list(50)
    train = open_dataset(imagenet_root, "train", subset="imagenet50", image_size=4, **FAST)
    assert train.class_names == [name for _, name in listed]
    assert len(train) == 50  # the extra ImageNet-100 wnid is excluded
    wnids = [name.split("/")[1] for name in names_of(train)]
    assert [listed[t][0] for t in train.targets] == wnids
    assert "imagenet50" in train.source
    val = open_dataset(imagenet_root, "eval", subset="imagenet50", image_size=4, **FAST)
    assert val.targets.tolist() == [0, 3]
    assert names_of(val) == [f"val/{listed[0][0]}/val_{listed[0][0]}.JPEG", f"val/{listed[3][0]}/val_{listed[3][0]}.JPEG"]


def test_imagenet_without_subset_uses_all_sorted_wnids(imagenet_root):
    train = open_dataset(imagenet_root, "train", fmt="imagenet", image_size=4, **FAST)
    wnids = sorted(p.name for p in (imagenet_root / "train").iterdir())
    assert train.num_classes == 51 and train.class_names == wnids
    val = open_dataset(imagenet_root, "eval", fmt="imagenet", image_size=4, **FAST)
    assert sorted(val.targets.tolist()) == sorted(wnids.index(n.split("/")[1]) for n in names_of(val))


def test_imagenet_flat_val_with_loc_csv(imagenet_root):
    root = imagenet_root / "flat"
    listed = subset_list(50)
    val = open_dataset(root, "eval", fmt="imagenet", subset="imagenet50", image_size=4, **FAST)
    assert names_of(val) == ["val/ILSVRC2012_val_00000000.JPEG", "val/ILSVRC2012_val_00000001.JPEG"]
    assert val.targets.tolist() == [7, 1] and val.class_names[7] == listed[7][1]


def test_imagenet_missing_loc_csv(imagenet_root, tmp_path):
    root = tmp_path
    (root / "train").symlink_to(imagenet_root / "train", target_is_directory=True)
    (root / "val").symlink_to(imagenet_root / "flat" / "val", target_is_directory=True)
    with pytest.raises(DataError, match="LOC_val_solution.csv"):
        open_dataset(root, "eval", fmt="imagenet", image_size=4, **FAST)


def test_imagenet_subset_wnid_missing(imagenet_root):
    in50 = {w for w, _ in subset_list(50)}
    missing = next(w for w, _ in subset_list(100) if w not in in50 and not (imagenet_root / "train" / w).exists())
    with pytest.raises(DataError, match=f"{missing}.*data.subset=imagenet100"):
        open_dataset(imagenet_root, "train", subset="imagenet100", image_size=4, **FAST)


# ---- bad paths and settings ----------------------------------------------------------------------


def test_missing_path_and_empty_folder(tmp_path):
    with pytest.raises(DataError, match="nope.*does not exist"):
        open_dataset(tmp_path / "nope", "train", **FAST)
    with pytest.raises(DataError, match="empty"):
        detect_format(tmp_path)
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(DataError, match=r"no known dataset layout.*IDX.*CIFAR-10.*STL-10.*ImageNet"):
        detect_format(tmp_path)
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(DataError, match="no class subfolders"):
        open_dataset(tmp_path, "train", fmt="imagefolder", **FAST)
    with pytest.raises(DataError, match="no image files"):
        open_dataset(tmp_path, "train", fmt="flat", **FAST)


@pytest.mark.parametrize(
    "kwargs, setting",
    [
        (dict(fmt="jpegs"), "data.format"),
        (dict(subset="imagenet10"), "data.subset"),
        (dict(on_bad_image="ignore"), "data.on_bad_image"),
        (dict(image_size=0), "data.image_size"),
        (dict(channels=2), "data.channels"),
        (dict(max_images=0), "data.max_images"),
        (dict(split="test"), "split"),
    ],
)
def test_bad_settings_raise_config_error(tmp_path, kwargs, setting):
    save_image(tmp_path / "a.png")
    args = dict(split="train", **FAST)
    args.update(kwargs)
    with pytest.raises(ConfigError, match=setting) as info:
        open_dataset(tmp_path, **args)
    assert "\n" not in str(info.value)


def test_array_cache_is_built_once_reused_and_rebuilt_when_the_data_changes(tmp_path):
    root = tmp_path / "fashion-tiny"
    make_idx(root)
    first = open_dataset(root, "train")
    cache_file = first.path
    stamp = cache_file.stat().st_mtime_ns
    second = open_dataset(root, "train")
    assert second.path == cache_file and cache_file.stat().st_mtime_ns == stamp  # reused, not rewritten
    assert not np.load(cache_file, mmap_mode="r").flags.writeable
    assert len(pickle.dumps(second)) < 4096  # workers get the path, never the pixels
    make_idx(root, n_train=8)  # the dataset changes: a new cache
    changed = open_dataset(root, "train")
    assert changed.path != cache_file and len(changed) == 8
    assert not any(p.name.startswith(".tmp") for p in cache_file.parent.parent.iterdir())


def test_array_cache_folder_is_not_writable_names_the_setting(tmp_path):
    root = tmp_path / "fashion-tiny"
    make_idx(root)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(DataError, match="data.cache_dir"):
        formats.open_dataset(root, "train", cache_dir=blocker / "cache")


def test_file_images_keep_their_aspect_with_the_default_resize(tmp_path):
    save_image(tmp_path / "wide.png", size=(40, 20))
    data = formats.open_dataset(tmp_path, "train", fmt="flat", image_size=14)
    assert data.resize_size == 16 and data.read(0).shape == (3, 16, 32)
    assert images_of(data).shape == (1, 3, 14, 14)


# ---- the real Fashion-MNIST ----------------------------------------------------------------------


@pytest.mark.skipif(not fashion_mnist_dir().is_dir(), reason="Fashion-MNIST not installed at /usr/share/datasets/fashion-mnist")
def test_real_fashion_mnist():
    assert detect_format(fashion_mnist_dir()) == "idx"
    train = open_dataset(fashion_mnist_dir(), "train")
    test = open_dataset(fashion_mnist_dir(), "eval")
    assert images_of(train).shape == (60000, 1, 28, 28) and images_of(test).shape == (10000, 1, 28, 28)
    assert train.num_classes == 10 and train.class_names[9] == "Ankle boot"
    assert np.bincount(train.targets).tolist() == [6000] * 10
    assert np.bincount(test.targets).tolist() == [1000] * 10
