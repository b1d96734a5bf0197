"""Write a small labelled image folder of another kind than Fashion-MNIST: coloured shapes on coloured noise.

`python benchmarks/make_shapes.py OUT [--per-class 400] [--test-per-class 200] [--size 32] [--seed 0]` writes
OUT/train/<shape>/<i>.png and OUT/test/<shape>/<i>.png (other random draws) for five shapes (circle, square,
triangle, cross, ring), each at a random position, size, rotation and pair of colours over noise. Pixels say little about the class here (k-means on them is near chance) while the shape is obvious to a
person: the small-data check of README ("Measured results") runs the demo recipe on 2,000 of these images.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "cross", "ring")
SUPERSAMPLE = 4  # drawn at 4x, then downsampled: smooth edges at any size


def _polygon(center, radius, angle, corners):
    return [(center[0] + radius * math.cos(angle + 2 * math.pi * i / corners),
             center[1] + radius * math.sin(angle + 2 * math.pi * i / corners)) for i in range(corners)]


def draw_shape(shape: str, size: int, rng: np.random.Generator) -> Image.Image:
    big = size * SUPERSAMPLE
    background = rng.integers(0, 256, 3)
    foreground = (background + rng.integers(80, 176, 3)) % 256  # always far from the background in some channel
    noise = rng.normal(0, 18, (big, big, 3))
    canvas = Image.fromarray(np.clip(background + noise, 0, 255).astype(np.uint8))
    pen = ImageDraw.Draw(canvas)
    radius = rng.uniform(0.22, 0.38) * big
    margin = radius + 1
    center = rng.uniform(margin, big - margin, 2)
    angle = rng.uniform(0, 2 * math.pi)
    color = tuple(int(c) for c in foreground)
    x, y = center
    if shape == "circle":
        pen.ellipse([x - radius, y - radius, x + radius, y + radius], fill=color)
    elif shape == "ring":
        pen.ellipse([x - radius, y - radius, x + radius, y + radius], outline=color, width=int(radius * 0.35))
    elif shape == "square":
        pen.polygon(_polygon(center, radius, angle, 4), fill=color)
    elif shape == "triangle":
        pen.polygon(_polygon(center, radius, angle, 3), fill=color)
    elif shape == "cross":
        for turn in (0.0, math.pi / 2):
            a = angle + turn
            dx, dy = math.cos(a) * radius, math.sin(a) * radius
            pen.line([(x - dx, y - dy), (x + dx, y + dy)], fill=color, width=int(radius * 0.45))
    else:
        raise ValueError(f"unknown shape {shape!r}; choose from {', '.join(SHAPES)}")
    return canvas.resize((size, size), Image.LANCZOS)


def write_folder(out: Path, per_class: int, size: int, seed: int) -> int:
    rng = np.random.default_rng(seed)  # one stream over all classes: a test seed never repeats a train image
    count = 0
    for shape in SHAPES:
        folder = out / shape
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            draw_shape(shape, size, rng).save(folder / f"{i:05d}.png")
            count += 1
    return count


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder to write (class sub-folders)")
    parser.add_argument("--per-class", type=int, default=400)
    parser.add_argument("--test-per-class", type=int, default=200)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    train = write_folder(args.out / "train", args.per_class, args.size, args.seed)
    test = write_folder(args.out / "test", args.test_per_class, args.size, args.seed + 1_000_003)
    print(f"wrote {train} training and {test} test images of {len(SHAPES)} shapes to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
