"""DEX's single view: albumentations' whole-image rotation then crop (warp: image) vs one warp
of the crop's window (warp: crop), per view at source sides 256 / 512 / 1024 (issue 30 item 4).

Run: OMP_NUM_THREADS=1 python experiments/benchmarks/bench_view_warp.py
"""

import sys
import time
from pathlib import Path

import cv2
import torch

sys.path.insert(0, ".")
from midol.data import load_image  # noqa: E402
from midol.data.transforms.single_view import SingleViewTransform  # noqa: E402


def main() -> None:
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    src = load_image(sorted(Path("sample_data").rglob("*.jp*g"))[0])
    print("source", src.shape)
    for side in (256, 512, 1024):
        img = cv2.resize(src, (side, side), interpolation=cv2.INTER_CUBIC)
        for _ in range(2):
            for warp in ("image", "crop"):
                t = SingleViewTransform(size=256, warp=warp, seed=0)
                n = 150
                t0 = time.process_time()
                for _ in range(n):
                    t(img)
                print(side, warp, f"{(time.process_time() - t0) / n * 1000:.2f} ms/view", flush=True)


if __name__ == "__main__":
    main()
