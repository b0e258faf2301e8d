"""How fast the built-in shapes data renders (the data loader must never be what a CPU run waits for).

    python benchmarks/shapes_rendering.py            # ms per batch of 64 images at 16, 32 and 64 px

A batch is rendered with supersampling in one vectorised pass; at 64 px it should take a few milliseconds,
far below a training step (about 50 ms for the main job's 16 px base on 2 cores).
"""

from __future__ import annotations

import time

from imagen_lib.data.shapes import ShapesDataset


def batch_milliseconds(image_size: int, batches: int = 10, batch_size: int = 64) -> float:
    """The fastest of ``batches`` renders of ``batch_size`` images, in ms (the first, warm-up batch not counted)."""
    data = ShapesDataset(image_size, seed=0)
    data.batch(range(batch_size))
    timings = []
    for k in range(1, batches + 1):
        start = time.perf_counter()
        data.batch(range(batch_size * k, batch_size * (k + 1)))
        timings.append(time.perf_counter() - start)
    return min(timings) * 1000


if __name__ == "__main__":
    for size in (16, 32, 64):
        print(f"{size:3d} px: {batch_milliseconds(size):6.1f} ms per batch of 64")
