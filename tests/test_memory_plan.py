"""The --dry-run memory plan: ImageNet-1k on 8 nodes x 8 GPUs fits, and per-rank host memory is flat in N."""
import subprocess
import sys

from scan_dist.config import load_config
from scan_dist.memory_plan import format_memory_plan, plan_memory


def stage(plan, name):
    return next(s for s in plan["stages"] if s["stage"] == name)


def test_imagenet1k_on_64_gpus_fits_a_node():
    plan = plan_memory(load_config("imagenet1k"), world=64, tasks_per_node=8, gpu=True)
    assert plan["train_images"] == 1281167 and plan["backbone_params"] > 20e6
    assert 50 < plan["activation_mb_per_image_fp32"] < 150  # ResNet-50 at 224, counted on the meta device
    for st in plan["stages"]:
        assert st["host_gb_per_rank"] * 8 < 480, st  # the profile's 480 GB node
        assert st["gpu_gb_per_rank"] < 80 * 0.9, st
    # the decoded images never appear: the largest host item of any stage is far below N x 3 x 224 x 224
    assert max(i["gb"] for st in plan["stages"] for i in st["items"] if i["where"] == "host") < 2


def test_host_memory_per_rank_is_flat_in_the_number_of_images():
    """Between ImageNet-50 and ImageNet-1k (x20 images) a rank's private host memory grows only by the reader's
    index (file names) and its own share of the neighbour lists: nothing O(N x image) or O(N x D) is private."""
    small = plan_memory(load_config("imagenet1k", ["data.max_images=64000"]), 64, 8, True)
    big = plan_memory(load_config("imagenet1k"), 64, 8, True)
    assert big["train_images"] == 20 * small["train_images"] + 1167
    for name in ("embed", "scan", "selflabel"):
        grow = stage(big, name)["host_gb_per_rank"] - stage(small, name)["host_gb_per_rank"]
        assert grow < 0.1, (name, grow)  # 1.28M names x 48 B = 0.06 GB


def test_dry_run_prints_the_memory_plan(tmp_path):
    out = subprocess.run([sys.executable, "-m", "scan_dist.launch", "--dry-run", "--run-dir", str(tmp_path / "r"),
                          "demo"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "memory plan per rank" in out.stdout and "pretext" in out.stdout and "train images" in out.stdout
    assert "host GB/rank" in format_memory_plan(plan_memory(load_config("demo"), 1, 1, False))


def test_self_labelling_plans_for_what_the_scan_stage_hands_on():
    """scan.select=ensemble hands scan.ensemble_size heads to self-labelling: its weights and EMA teacher are
    counted for all of them (wide MLP heads here, so the difference shows at the plan's 0.1 MB rounding)."""
    def weights_gb(*overrides):
        plan = plan_memory(load_config("demo", ["scan.head_hidden=4096", *overrides]), 1, 1, False)
        return sum(i["gb"] for i in stage(plan, "selflabel")["items"] if i["what"].startswith(("weights", "EMA")))

    one, ten = weights_gb("scan.select=consensus"), weights_gb("scan.select=ensemble", "scan.ensemble_size=10")
    from scan_dist.models.backbones import build_backbone
    d = build_backbone("cnn_small", 1, 16).out_dim  # the plan sizes heads on the backbone's features
    head_gb = (d * 4096 + 4096 + 4096 * 10 + 10) * 4 / 1e9
    assert abs((ten - one) - 2 * 9 * head_gb) < 1e-3, (one, ten, head_gb)  # weights + EMA copy of 9 more heads
    # a tie's size is known only after training: planned for every head, whatever scan.ensemble_size says
    tied = weights_gb("scan.select=ensemble", "scan.ensemble_rank=tie", "scan.ensemble_size=2")
    heads = load_config("demo").scan.num_heads
    assert abs((tied - one) - 2 * (heads - 1) * head_gb) < 1e-3, (one, tied, heads)


def test_embed_plans_for_the_layer_it_writes():
    """The embeddings the embed stage writes: projection_dim wide, out_dim for the pooled backbone, grid^2 x out_dim
    for mine.layer=grid (ImageNet-1k: 1.28M x 2048 x 9 x 4 B = 94 GB on the node's disk for a 3x3 grid)."""
    def embed_gb(*overrides):
        plan = plan_memory(load_config("imagenet1k", list(overrides)), 64, 8, True)
        return next(i["gb"] for i in stage(plan, "embed")["items"] if i["what"].startswith("train embeddings"))

    n = 1281167
    assert abs(embed_gb("mine.layer=projection") - n * 128 * 4 / 1e9) < 0.01
    assert abs(embed_gb("mine.layer=backbone") - n * 2048 * 4 / 1e9) < 0.01
    assert abs(embed_gb("mine.layer=grid", "mine.grid=3") - 9 * n * 2048 * 4 / 1e9) < 0.1
