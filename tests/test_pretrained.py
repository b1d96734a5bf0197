"""Pretrained-backbone import: each published checkpoint layout loads exactly; mismatches fail with one clear line."""
import argparse
import subprocess
import sys
from collections import OrderedDict

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock

from scan_dist.errors import DataError
from scan_dist.models.backbones import _TorchvisionResNet, _small_image_stem, build_backbone
from scan_dist.models.heads import SimCLRModel
from scan_dist.models.pretrained import load_pretrained_backbone


def _randomise(module: nn.Module, seed: int) -> nn.Module:
    """Random values in every tensor (BatchNorm statistics and counters included), so a skipped copy shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if tensor.is_floating_point():
                tensor.copy_(torch.rand(tensor.shape, generator=gen) + 0.5)
            else:
                tensor.fill_(int(torch.randint(1, 1000, (), generator=gen)))
    return module


def _resnet(channels: int = 3) -> nn.Module:
    """resnet18_cifar cut to one BasicBlock a stage (same key names and shapes, half the tensors to write on 2 CPU
    cores), freshly initialised: its BatchNorm statistics and counters differ from the randomised source's."""
    net = torchvision.models.ResNet(BasicBlock, [1, 1, 1, 1])
    _small_image_stem(net, channels, maxpool=False)
    return _TorchvisionResNet(net, 512)


def _tiny() -> nn.Module:
    return build_backbone("cnn_small", 1, 4)


@pytest.fixture(scope="module")
def source() -> nn.Module:
    """The pretrained encoder every checkpoint is made from (randomised once: it is the slow part on 2 cores)."""
    return _randomise(_resnet(), 1)


def _torchvision_keys(backbone: nn.Module) -> OrderedDict:
    """The backbone's tensors under torchvision's own ResNet names (our wrapper adds `net.`)."""
    return OrderedDict((k[len("net."):], v.clone()) for k, v in backbone.state_dict().items())


def _mlp(prefix: str, dims=(512, 64, 32)) -> dict:
    return {f"{prefix}0.weight": torch.randn(dims[1], dims[0]), f"{prefix}0.bias": torch.randn(dims[1]),
            f"{prefix}2.weight": torch.randn(dims[2], dims[1]), f"{prefix}2.bias": torch.randn(dims[2])}


def _assert_equal(backbone: nn.Module, source: nn.Module) -> None:
    got, want = backbone.state_dict(), source.state_dict()
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key


def _moco_v2(source: nn.Module) -> dict:
    tv = _torchvision_keys(source)
    state = OrderedDict()
    for k, v in tv.items():
        state[f"module.encoder_q.{k}"] = v
    state.update(_mlp("module.encoder_q.fc."))
    for k, v in tv.items():  # the key encoder: same shapes, other values; must not be the one loaded
        state[f"module.encoder_k.{k}"] = v + 1 if v.is_floating_point() else v
    state.update(_mlp("module.encoder_k.fc."))
    state["module.queue"] = torch.randn(32, 64)
    state["module.queue_ptr"] = torch.zeros(1, dtype=torch.long)
    args = argparse.Namespace(arch="resnet18", lr=0.03, mlp=True, moco_k=64)
    return {"epoch": 200, "arch": "resnet18", "state_dict": state, "optimizer": {"state": {}, "param_groups": []},
            "args": args}


def _moco_v3(source: nn.Module) -> dict:
    tv = _torchvision_keys(source)
    state = OrderedDict()
    for branch in ("base_encoder", "momentum_encoder"):
        for k, v in tv.items():
            state[f"module.{branch}.{k}"] = v if branch == "base_encoder" else v * 2
        # MoCo v3's ResNet projector: Linear, BN, ReLU, Linear, BN (BatchNorm buffers included)
        state[f"module.{branch}.fc.0.weight"] = torch.randn(64, 512)
        state[f"module.{branch}.fc.1.weight"] = torch.randn(64)
        state[f"module.{branch}.fc.1.running_mean"] = torch.randn(64)
        state[f"module.{branch}.fc.1.num_batches_tracked"] = torch.tensor(7)
        state[f"module.{branch}.fc.3.weight"] = torch.randn(32, 64)
    state.update(_mlp("module.predictor.", (32, 64, 32)))
    return {"epoch": 100, "arch": "resnet18", "state_dict": state, "optimizer": {}, "scaler": {}}


def _ddp(source: nn.Module) -> dict:
    state = OrderedDict((f"module.{k}", v) for k, v in _torchvision_keys(source).items())
    state["module.fc.weight"], state["module.fc.bias"] = torch.randn(10, 512), torch.randn(10)
    return state


def _torchvision(source: nn.Module) -> dict:
    state = _torchvision_keys(source)
    state["fc.weight"], state["fc.bias"] = torch.randn(1000, 512), torch.randn(1000)
    return state


def _simclr(source: nn.Module) -> dict:
    state = OrderedDict((f"backbone.{k}", v) for k, v in _torchvision_keys(source).items())
    state.update(_mlp("contrastive_head."))
    return {"model": state, "optimizer": {}, "epoch": 500}


def _ours(source: nn.Module) -> dict:
    model = SimCLRModel(source, 32)
    return {"model": model.state_dict()}


LAYOUTS = {
    "moco_v2": (_moco_v2, "MoCo v2", {"key (momentum) encoder", "negatives queue"}),
    "moco_v3": (_moco_v3, "MoCo v3", {"momentum encoder", "predictor MLP"}),
    "ddp": (_ddp, "DDP-wrapped torchvision ResNet", set()),
    "torchvision": (_torchvision, "torchvision ResNet", set()),
    "simclr": (_simclr, "SimCLR-style (backbone.*)", set()),
    "ours": (_ours, "scan_dist pretext model", set()),
}


@pytest.mark.parametrize("name, arch", [("resnet18_cifar", "resnet18"), ("resnet50", "resnet50")])
def test_backbone_names_are_torchvision_names_under_net(name, arch):
    """The key mapping the loader relies on: our ResNets are torchvision's (fc dropped) inside a `net.` wrapper.
    Built on the meta device: names and shapes only, no initialisation cost."""
    with torch.device("meta"):
        ours = build_backbone(name, 3).state_dict()
        theirs = getattr(torchvision.models, arch)(weights=None).state_dict()
    expected = {f"net.{k}": tuple(v.shape) for k, v in theirs.items() if not k.startswith("fc.")}
    if name == "resnet18_cifar":  # the CIFAR stem: a 3x3 first convolution
        expected["net.conv1.weight"] = (64, 3, 3, 3)
    assert {k: tuple(v.shape) for k, v in ours.items()} == expected


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layout_loads_exactly(tmp_path, source, layout):
    make, fmt, dropped_reasons = LAYOUTS[layout]
    path = tmp_path / f"{layout}.pth.tar"
    torch.save(make(source), path)
    backbone = _resnet()
    report = load_pretrained_backbone(backbone, path)
    _assert_equal(backbone, source)
    assert report["format"] == fmt
    assert report["loaded"] == len(source.state_dict())
    assert dropped_reasons <= set(report["dropped"])
    # every layout here carries a projection head or classifier beside the encoder: dropped, with the reason
    assert any("head" in reason for reason in report["dropped"]), report["dropped"]
    assert str(path) in report["summary"] and fmt in report["summary"]


def test_moco_v2_drops_projection_mlp_and_key_encoder(tmp_path, source):
    path = tmp_path / "moco.pth.tar"
    torch.save(_moco_v2(source), path)
    report = load_pretrained_backbone(_resnet(), path)
    assert report["prefix"] == "module.encoder_q."
    heads = [keys for reason, keys in report["dropped"].items() if "head" in reason]
    assert heads == [[f"module.encoder_q.fc.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")]]
    assert len(report["dropped"]["key (momentum) encoder"]) == len(source.state_dict()) + 4
    assert report["dropped"]["negatives queue"] == ["module.queue", "module.queue_ptr"]


def test_cifar_resnet_shortcut_names(tmp_path, source):
    """CIFAR ResNets written with `shortcut` blocks (as in the SCAN authors' code) map onto torchvision's
    `downsample`."""
    state = {k.replace(".downsample.", ".shortcut."): v for k, v in _torchvision_keys(source).items()}
    path = tmp_path / "cifar.pth"
    torch.save({"net": state}, path)
    backbone = _resnet()
    report = load_pretrained_backbone(backbone, path)
    _assert_equal(backbone, source)
    assert "shortcut -> downsample" in report["renamed"] and report["nesting"] == ["net"]


def test_small_cnn_plain_state_dict(tmp_path):
    source = _randomise(build_backbone("cnn_small", 1, 8), 5)
    path = tmp_path / "cnn.pt"
    torch.save(source.state_dict(), path)
    backbone = _randomise(build_backbone("cnn_small", 1, 8), 6)
    report = load_pretrained_backbone(backbone, path)
    _assert_equal(backbone, source)
    assert report["format"] == "plain state dict" and not report["dropped"]


def test_missing_num_batches_tracked_is_tolerated(tmp_path, source):
    state = {k: v for k, v in _torchvision_keys(source).items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "converted.pth"
    torch.save({"state_dict": state}, path)
    backbone = _resnet()
    before = {k: v.clone() for k, v in backbone.state_dict().items() if k.endswith("num_batches_tracked")}
    report = load_pretrained_backbone(backbone, path)
    assert sorted(report["kept"]) == sorted(before)
    for key, value in backbone.state_dict().items():
        want = before[key] if key in before else source.state_dict()[key]
        assert torch.equal(value, want), key


def test_missing_tensor_is_a_clear_error(tmp_path, source):
    checkpoint = _moco_v2(source)
    for name in ("layer4.0.conv2.weight", "layer4.0.bn2.weight", "layer4.0.bn2.bias"):
        del checkpoint["state_dict"][f"module.encoder_q.{name}"]
    path = tmp_path / "broken.pth.tar"
    torch.save(checkpoint, path)
    with pytest.raises(DataError) as err:
        load_pretrained_backbone(_resnet(), path)
    message = str(err.value)
    assert f"model.pretrained={path}" in message
    assert "looks like MoCo v2" in message
    assert "3 of" in message and "backbone tensors are missing" in message
    assert "net.layer4.0.conv2.weight" in message


def test_shape_mismatch_is_a_clear_error(tmp_path, source):
    path = tmp_path / "rgb.pth"
    torch.save(_torchvision(source), path)
    with pytest.raises(DataError) as err:
        load_pretrained_backbone(_resnet(channels=1), path)
    message = str(err.value)
    assert f"model.pretrained={path}" in message and "torchvision ResNet" in message
    assert "conv1.weight is [64, 3, 3, 3] but the backbone needs [64, 1, 3, 3]" in message
    assert "data.channels" in message


def test_larger_encoder_is_an_error_not_a_truncated_load(tmp_path, source):
    state = _torchvision_keys(source)
    state["layer1.1.conv1.weight"] = torch.randn(64, 64, 3, 3)  # a deeper ResNet's extra block
    path = tmp_path / "deeper.pth"
    torch.save(state, path)
    with pytest.raises(DataError, match=r"1 checkpoint tensors have no place in the backbone: layer1\.1\.conv1"):
        load_pretrained_backbone(_resnet(), path)


def test_wrong_architecture_is_a_clear_error(tmp_path):
    path = tmp_path / "cnn.pt"
    torch.save(build_backbone("cnn_small", 3, 8).state_dict(), path)
    with pytest.raises(DataError, match=r"backbone tensors are missing: net\.conv1\.weight"):
        load_pretrained_backbone(_resnet(), path)


@pytest.mark.parametrize("content", [b"not a checkpoint at all", b"PK\x03\x04truncated zip", b""])
def test_unreadable_file_is_a_clear_error(tmp_path, content):
    path = tmp_path / "weights.pth"
    path.write_bytes(content)
    with pytest.raises(DataError, match=rf"cannot read model\.pretrained={path}"):
        load_pretrained_backbone(_tiny(), path)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match=r"model\.pretrained=.*nope\.pth: the file does not exist"):
        load_pretrained_backbone(_tiny(), tmp_path / "nope.pth")


class _Opaque:  # a pickled class outside the allowlist: must be refused, never unpickled
    pass


def test_unsafe_pickle_is_refused(tmp_path):
    path = tmp_path / "unsafe.pth"
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}, "extra": _Opaque()}, path)
    with pytest.raises(DataError, match=r"weights-only loading: unsupported pickled class .*_Opaque"):
        load_pretrained_backbone(_tiny(), path)


def test_no_state_dict_is_a_clear_error(tmp_path):
    path = tmp_path / "meta.pth"
    torch.save({"epoch": 3, "optimizer": {"state": {}}}, path)
    with pytest.raises(DataError, match=r"no state dict found \(top-level keys: \['epoch', 'optimizer'\]"):
        load_pretrained_backbone(_tiny(), path)


@pytest.mark.slow
def test_pipeline_skips_simclr_with_pretrained(tmp_path, fashion_mnist):
    # the smoke preset's backbone: cnn_small, width 16, one channel; saved as a MoCo v2 checkpoint
    source = _randomise(build_backbone("cnn_small", 1, 16), 12)
    state = OrderedDict((f"module.encoder_q.{k}", v) for k, v in source.state_dict().items())
    state.update(_mlp("module.encoder_q.fc.", (64, 64, 32)))
    ckpt = tmp_path / "moco.pth.tar"
    torch.save({"state_dict": state, "args": argparse.Namespace(arch="cnn_small")}, ckpt)
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "scan_dist.launch", "--run-dir", str(run_dir), "smoke", f"model.pretrained={ckpt}",
         "run.progress=false", "data.max_images=512", "data.max_eval_images=256", "scan.epochs=1",
         "selflabel.enabled=false", "run.baseline=false"],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    log = (run_dir / "log.txt").read_text()
    assert "MoCo v2 checkpoint" in log and "SimCLR training skipped" in log
    saved = torch.load(run_dir / "pretext" / "model.pt", weights_only=True)["model"]
    for key, value in source.state_dict().items():
        assert torch.equal(saved[f"backbone.{key}"], value), key
