"""Write a small synthetic image-folder dataset, `<root>/{train,test}/<class>/*.png`, to try the
whole chain on data that is not CIFAR-10 (any size, grayscale or RGB).

    .venv/bin/python examples/make_image_folder.py /tmp/gray28 --size 28 --mode L
    .venv/bin/python examples/make_image_folder.py /tmp/rgb224 --size 224 --classes 3 --per-class 12

Each class is a bright bar at its own height on noise: learnable in an epoch or two.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image


def write_folder(root: Path, size: int, mode: str, classes: int, per_class: int, test_per_class: int,
                 seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for split, count in (("train", per_class), ("test", test_per_class)):
        for label in range(classes):
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                image = rng.integers(0, 90, size=(size, size, 3), dtype=np.uint8)
                top = label * size // classes
                image[top:top + max(1, size // classes), size // 4:3 * size // 4] = 230
                Image.fromarray(image).convert(mode).save(folder / f"{index:05d}.png")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path)
    parser.add_argument("--size", type=int, default=28, help="image side in pixels (default 28)")
    parser.add_argument("--mode", choices=("L", "RGB"), default="L", help="L: grayscale (default), RGB: colour")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--per-class", type=int, default=50, help="training images per class (default 50)")
    parser.add_argument("--test-per-class", type=int, default=10)
    args = parser.parse_args(argv)
    write_folder(args.root, args.size, args.mode, args.classes, args.per_class, args.test_per_class)
    print(f"wrote {args.classes} classes of {args.size}x{args.size} {args.mode} images to {args.root}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
