"""How fast is the phantom generator? Target: 1000 images at 128 px well under 30 s on 2 cores.

    python benchmarks/bench_phantom.py [n_images] [image_size] [--no-default-sets]

Prints images/s and the time for the default phantom source + target sets.
"""
import sys
import time

from fu_kedro.data_sources import CLASSES, generate_phantoms


def main(n_images: int = 1000, image_size: int = 128, default_sets: bool = True) -> None:
    per_class = n_images // len(CLASSES)
    t0 = time.perf_counter()
    s = generate_phantoms("source", per_class, image_size, seed=0)
    dt = time.perf_counter() - t0
    print(f"phantom source: {len(s)} images at {image_size} px in {dt:.2f} s ({len(s) / dt:.0f} images/s)")
    if not default_sets:
        return
    t0 = time.perf_counter()
    s = generate_phantoms("source", 120, image_size, seed=42)
    t = generate_phantoms("target", 50, image_size, seed=42)
    print(f"default sets (source {len(s)} + target {len(t)}): {time.perf_counter() - t0:.2f} s")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:3] if a.isdigit()), default_sets="--no-default-sets" not in sys.argv)
