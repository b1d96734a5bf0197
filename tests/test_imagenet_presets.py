"""The ImageNet presets end to end on a tiny ImageNet-layout stand-in (real JPEGs of Fashion-MNIST, real wnids).

Each preset runs as shipped through `python -m scan_dist.launch` with only toy-size overrides: 32 px images, one
epoch of SCAN and self-labelling, CPU. The batch sizes (512 / 1024 / 4096) are left alone: the training loop caps a
batch at the data set size, so each stage is one step. Both val layouts are covered: a flat `val/` labelled by
`LOC_val_solution.csv` (imagenet50, imagenet1k) and `val/<wnid>/` folders (imagenet100, imagenet200). The subset
stand-ins also hold a few classes outside the subset (in train/ and val/, as the real ImageNet folder does), which
the runs must leave out.

What is checked is the layouts and the preset plumbing (subset class lists, num_clusters, head-only SCAN, the
pretrained-backbone import), not accuracy: the backbones are random, so ACC is near chance.
"""
import csv
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from imagenet_standin import build_imagenet_standin
from scan_dist.data.formats import open_dataset

pytestmark = pytest.mark.slow

TOY = ("data.image_size=32", "run.device=cpu", "scan.epochs=1", "selflabel.epochs=1")
# imagenet100/200/1k: the presets' ResNet-50 (random, as no MoCo weights ship with the tests) swapped for the small
# CNN: a ResNet-50 forward/backward costs ~30 s a run on 2 CPU cores and adds nothing to what is tested here.
# imagenet50 keeps the ResNet-50 and starts it from a MoCo v2 checkpoint, as the paper's recipe does.
SMALL_BACKBONE = ("model.backbone=cnn_small", "model.width=16")

# preset, flat val?, train / val images per class, extra classes outside the subset, overrides beyond TOY
CASES = [
    ("imagenet50", True, 3, 1, 5, ()),
    ("imagenet100", False, 3, 1, 5, SMALL_BACKBONE),
    ("imagenet200", False, 2, 1, 5, SMALL_BACKBONE),
    # no subset: every train/<wnid> folder is a class, and num_clusters=1000 needs 1000 training images: 1 a class.
    # run.baseline=false: k-means with 1000 clusters on 1000 eval images is meaningless here and costs seconds.
    ("imagenet1k", True, 1, 1, 0, (*SMALL_BACKBONE, "run.baseline=false")),
]
assert {flat for _, flat, *_ in CASES} == {True, False}, "both val layouts must be covered"

FLAT_NAME = re.compile(r"val/ILSVRC2012_val_\d{8}\.JPEG")
FOLDER_NAME = re.compile(r"val/(n\d{8})/ILSVRC2012_val_\d{8}\.JPEG")


def launch(run_dir: Path, preset: str, data_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "scan_dist.launch", "--local", "--run-dir", str(run_dir), preset,
           f"data.path={data_path}", "run.progress=false", *TOY, *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def moco_v2_checkpoint(path: Path) -> Path:
    """A MoCo v2-layout ResNet-50 checkpoint (random weights): query encoder with its MLP projection, a key encoder
    entry and the negatives queue, all under `state_dict` with DDP's `module.` prefix."""
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.resnet50(weights=None)
    net.fc = torch.nn.Sequential(torch.nn.Linear(2048, 2048), torch.nn.ReLU(), torch.nn.Linear(2048, 128))
    state = {f"module.encoder_q.{k}": v for k, v in net.state_dict().items()}
    state["module.encoder_k.conv1.weight"] = state["module.encoder_q.conv1.weight"].clone()
    state["module.queue"] = torch.randn(128, 64)
    torch.save({"epoch": 200, "arch": "resnet50", "state_dict": state}, path)
    return path


@pytest.mark.parametrize("flat_val", [True, False], ids=["flat-csv", "wnid-folders"])
def test_reader_labels_match_standin(tmp_path, fashion_mnist, flat_val):
    """The reader's labels are the stand-in's ground truth, file by file, and the subset filter drops the extras."""
    info = build_imagenet_standin(tmp_path / "data", "imagenet50", 2, 2, flat_val, size=48, extra_classes=5)
    wnids = info["wnids"]
    for split, count in (("train", info["num_train"]), ("eval", info["num_val"])):
        images = open_dataset(info["root"], split, fmt="imagenet", image_size=32, subset="imagenet50")
        assert len(images) == count and images.channels == 3 and images.image_size == 32
        assert min(images.read(0).shape[1:]) == images.resize_size == 37  # shorter side 32 * 256 / 224
        assert images.class_names == info["class_names"]
        truth = [info["labels"][name.decode()] for name in images.names]
        assert [wnids[t] for t in images.targets] == truth
        assert not set(truth) & set(info["extra_wnids"])
    # without a subset every wnid folder is a class, named from LOC_synset_mapping.txt
    everything = open_dataset(info["root"], "eval", fmt="auto", image_size=32)
    assert everything.num_classes == 55 and len(everything) == 110
    name_of = dict(zip(wnids + info["extra_wnids"], info["class_names"] + info["extra_class_names"]))
    assert everything.class_names == [name_of[w].split(",")[0] for w in sorted(name_of)]


def test_kaggle_download_layout_loads(tmp_path, fashion_mnist):
    """Kaggle's ImageNet: images under ILSVRC/Data/CLS-LOC/{train,val}, LOC_val_solution.csv and the synset
    mapping at the download root; data.path may be either the download root or the CLS-LOC folder."""
    import shutil

    download = tmp_path / "kaggle"
    info = build_imagenet_standin(download / "ILSVRC" / "Data" / "CLS-LOC", "imagenet50", 2, 2, True, size=48)
    for name in ("LOC_val_solution.csv", "LOC_synset_mapping.txt"):
        shutil.move(str(Path(info["root"]) / name), str(download / name))
    for path in (download, Path(info["root"])):
        images = open_dataset(path, "eval", fmt="imagenet", image_size=32, subset="imagenet50")
        assert [info["wnids"][t] for t in images.targets] == [info["labels"][n.decode()] for n in images.names]
        assert len(open_dataset(path, "train", fmt="imagenet", image_size=32, subset="imagenet50")) == info["num_train"]


@pytest.mark.parametrize("preset,flat_val,per_train,per_val,extra,overrides", CASES, ids=[c[0] for c in CASES])
def test_imagenet_preset_end_to_end(tmp_path, fashion_mnist, preset, flat_val, per_train, per_val, extra, overrides,
                                    record_property):
    start = time.perf_counter()
    info = build_imagenet_standin(tmp_path / "data", preset, per_train, per_val, flat_val, size=48,
                                  extra_classes=extra)
    build_seconds = time.perf_counter() - start
    checkpoint = None
    if preset == "imagenet50":
        checkpoint = moco_v2_checkpoint(tmp_path / "moco_v2.pth.tar")
        overrides = (*overrides, f"model.pretrained={checkpoint}")
    run_dir = tmp_path / "run"
    start = time.perf_counter()
    result = launch(run_dir, preset, info["root"], *overrides)
    seconds = time.perf_counter() - start
    record_property("run_seconds", round(seconds, 1))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    stages = ", ".join(f"{k} {v:.1f}" for k, v in metrics["seconds"].items())
    print(f"{preset}: stand-in built in {build_seconds:.1f} s, run {seconds:.1f} s (stages: {stages})")

    n_classes = info["num_classes"]
    assert n_classes == (1000 if preset == "imagenet1k" else int(preset.removeprefix("imagenet")))
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert cfg["name"] == preset and cfg["num_clusters"] == n_classes
    assert cfg["data"]["subset"] == (None if preset == "imagenet1k" else preset)
    assert cfg["scan"]["num_heads"] == 10

    assert isinstance(metrics["acc"], float) and 0.0 <= metrics["acc"] <= 1.0
    assert metrics["preset"] == preset
    final = metrics["final"]
    assert final["num_classes"] == n_classes  # every subset class in the eval set, none of the extras
    assert metrics["stages"]["scan"]["best_head"] in range(10)
    assert metrics["stages"]["evaluate"]["num_images"] == info["num_val"]

    log = (run_dir / "log.txt").read_text()
    detail = "" if preset == "imagenet1k" else f", {preset}"
    assert f"train data: imagenet:{info['root']} (train{detail}), {info['num_train']} images, 3 channel(s)" in log
    assert f"eval data: imagenet:{info['root']} (eval{detail}), {info['num_val']} images, 3 channel(s)" in log
    if checkpoint is not None:
        assert str(checkpoint) in log and "SimCLR training skipped" in log

    with open(run_dir / "assignments.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == info["num_val"]
    subset = set(info["wnids"])
    for row in rows:
        assert info["labels"][row["path"]] in subset
        assert 0 <= int(row["cluster"]) < n_classes
        if flat_val:
            assert FLAT_NAME.fullmatch(row["path"]), row["path"]
        else:
            match = FOLDER_NAME.fullmatch(row["path"])
            assert match and match.group(1) == info["labels"][row["path"]], row["path"]
    assert len({info["labels"][row["path"]] for row in rows}) == n_classes
    assert np.isfinite([final["nmi"], final["ari"], final["ami"]]).all()
