"""Decode rate per CPU core of the candidate data paths for DEX (issue 30, item 4).

    taskset -c 1 python experiments/benchmarks/bench_decode.py \\
        --out experiments/results/decode_rates_2026-12-08.md

For real images from ``../shared/data`` held in memory as encoded bytes (no disk in the
timing), one process and one thread: images/s and source megapixels/s of each decoder, alone
(``decode``) and followed by the DEX preset's augmentation (``+DEX view``:
``SingleViewTransform(256, scale 0.2-1, rotate 15, hflip)``, what a DataLoader worker does per
image). Rates are images per CPU second of this single-threaded process
(``time.process_time``), so other processes on shared cores do not lower them (they still
share caches). The decoders take turns within each round; every figure is the best of
``--rounds`` rounds.

Decoders: Pillow (``Image.open`` + RGB array; midol's ``decode_image_bytes`` is this), Pillow
with ``Image.draft`` (JPEG DCT scaling to the smallest size >= the view), OpenCV
``cv2.imdecode`` (+ BGR->RGB) and ``IMREAD_REDUCED_COLOR_2`` (half size, only where the
short side is >= 2 x the view), ``torchvision.io.decode_jpeg`` / ``decode_png`` on the CPU,
simplejpeg (libjpeg-turbo, with its reduce-on-decode) and Pillow-SIMD when importable
(``--simd-path``: a folder holding a Pillow-SIMD build; it runs in a child process because it
replaces ``PIL``). Pre-shrunk shards: the same sources written by ``write_shards(max_side=...)``
(``midol shard --max-side``), as PNG and as JPEG.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import header, markdown_table, publish, python_command  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared" / "data"
# (label, folder under ../shared/data, pattern, at most): JPEG and PNG of several sizes
SETS = [
    ("JPEG 256x256 fundus (ODIR)", "fundus/odir_patients", "*.jpg", 200),
    ("JPEG 512x512 fundus (ODIR)", "fundus/odir_disease_eye", "*.jpg", 180),
    ("JPEG ~766x575 dermoscopy (PH2)", "dermoscopy/ph2_lesion", "*.jpg", 60),
    ("JPEG ~1000x370 OCT (OCTDL)", "oct/octdl_amd_vid_samples", "*.jpg", 21),
    ("PNG 224x224 H&E (NCT-CRC)", "histopathology/crc_he_tissue_9class", "*.png", 32),
]
Decoder = Callable[[bytes], np.ndarray]


def load_sets(root: Path) -> list[tuple[str, list[bytes]]]:
    sets = []
    for label, folder, pattern, most in SETS:
        files = sorted((root / folder).rglob(pattern))[:most]
        if not files:
            raise SystemExit(f"no {pattern} under {root / folder}: needs ../shared/data")
        sets.append((label, [f.read_bytes() for f in files]))
    # The 512 px fundus JPEGs re-encoded as PNG (cv2's default level): a lossless source.
    jpgs = sets[1][1]
    sets.append(("PNG 512x512 fundus (ODIR, re-encoded)",
                 [cv2.imencode(".png", cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR))[1]
                  .tobytes() for b in jpgs]))
    return sets


def shrunk_sets(root: Path, max_side: int) -> list[tuple[str, list[bytes]]]:
    """The 512 px fundus and the PH2 dermoscopy images through ``write_shards(max_side=...)``,
    stored as PNG (what ``midol shard --max-side`` writes) and, if the writer offers it, JPEG."""
    import inspect
    import tempfile

    from midol.data.shards import write_shards
    from midol.data.shards.stream import _image_of, _read_shard
    from midol.data.sources import DataSource

    sources = [DataSource(str(root / "fundus/odir_disease_eye"), "fundus"),
               DataSource(str(root / "dermoscopy/ph2_lesion/images"), "derm")]
    encodings = ["png"]
    if "encoding" in inspect.signature(write_shards).parameters:
        encodings.append("jpg")
    out = []
    for enc in encodings:
        with tempfile.TemporaryDirectory() as tmp:
            kwargs: dict[str, Any] = {"encoding": enc} if enc != "png" else {}
            index = write_shards(sources, tmp, max_side=max_side, progress=False, **kwargs)
            data = [_image_of(s)[0] for m in index.modalities for sh in index.shards[m]
                    for s in _read_shard(index.url(sh))]
        out.append((f"shard --max-side {max_side} as {enc.upper()} (ODIR 512 + PH2)", data))
    return out


def pil_decoders(size: int) -> dict[str, Decoder]:
    from PIL import Image

    def pil(b: bytes) -> np.ndarray:
        with Image.open(io.BytesIO(b)) as im:
            return np.asarray(im.convert("RGB"))

    def pil_draft(b: bytes) -> np.ndarray:
        with Image.open(io.BytesIO(b)) as im:
            if im.format == "JPEG":
                im.draft("RGB", (size, size))  # DCT scaling: both sides stay >= size
            return np.asarray(im.convert("RGB"))

    return {"Pillow": pil, "Pillow + draft": pil_draft}


def other_decoders(size: int) -> dict[str, Decoder]:
    import torchvision.io as tio

    def cv(b: bytes) -> np.ndarray:
        return cv2.cvtColor(cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR),
                            cv2.COLOR_BGR2RGB)

    def cv_reduced(b: bytes) -> np.ndarray:
        return cv2.cvtColor(cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_REDUCED_COLOR_2),
                            cv2.COLOR_BGR2RGB)

    def tv(b: bytes) -> np.ndarray:
        t = tio.decode_image(torch.frombuffer(bytearray(b), dtype=torch.uint8),
                             mode=tio.ImageReadMode.RGB)
        return t.permute(1, 2, 0).contiguous().numpy()  # HWC for the augmentation

    decoders: dict[str, Decoder] = {"OpenCV": cv, "OpenCV REDUCED_2": cv_reduced,
                                    "torchvision.io (CPU)": tv}
    try:
        import simplejpeg

        def sj(b: bytes) -> np.ndarray:
            if not simplejpeg.is_jpeg(b):
                raise ValueError("not a JPEG")
            return simplejpeg.decode_jpeg(b, colorspace="RGB", min_height=size, min_width=size)

        decoders["simplejpeg + reduce"] = sj
    except ImportError:
        pass
    from midol.data.image_io import decode_image_bytes

    decoders["midol decode_image_bytes"] = lambda b: decode_image_bytes(b)
    return decoders


def applies(name: str, label: str, size: int) -> bool:
    jpeg = label.startswith("JPEG") or "as JPG" in label
    if name in ("Pillow + draft", "simplejpeg + reduce") and not jpeg:
        return False
    if name == "OpenCV REDUCED_2":  # only where half size still covers the view
        return jpeg and "256x256" not in label and "224" not in label and "max-side" not in label
    return True


def measure(sets: list[tuple[str, list[bytes]]], decoders: dict[str, Decoder], size: int,
            rounds: int) -> list[dict[str, Any]]:
    from midol.data.transforms import SingleViewTransform

    view = SingleViewTransform(size=size, scale=(0.2, 1.0), rotate=15.0, hflip=0.5, seed=0)
    results = []
    for label, data in sets:
        names = [n for n in decoders if applies(n, label, size)]
        mpix = {}
        for n in names:  # warm-up, and the decoded size (megapixels of the output)
            arrays = [decoders[n](b) for b in data]
            mpix[n] = sum(a.shape[0] * a.shape[1] for a in arrays) / 1e6
            for a in arrays[:3]:
                view(a)
        best: dict[tuple[str, str], float] = {}
        for _ in range(rounds):
            for n in names:
                dec = decoders[n]
                t0 = time.process_time()
                for b in data:
                    dec(b)
                t1 = time.process_time()
                for k, b in enumerate(data):
                    view.reseed((0, k))
                    view(dec(b))
                t2 = time.process_time()
                for key, dt in (((n, "decode"), t1 - t0), ((n, "+view"), t2 - t1)):
                    best[key] = min(best.get(key, float("inf")), dt)
        src = sum(_pixels(data[k]) for k in range(len(data))) / 1e6
        for n in names:
            results.append({
                "set": label, "decoder": n, "images": len(data),
                "decode_img_s": len(data) / best[(n, "decode")],
                "view_img_s": len(data) / best[(n, "+view")],
                "source_mpix_s": src / best[(n, "decode")],
                "decoded_side": round((mpix[n] * 1e6 / len(data)) ** 0.5),
            })
    return results


def _version(module: str) -> str:
    try:
        return str(__import__(module).__version__)
    except ImportError:
        return "not installed"


def _pixels(b: bytes) -> int:
    from PIL import Image

    with Image.open(io.BytesIO(b)) as im:
        return im.size[0] * im.size[1]


def gpu_lines(sets: list[tuple[str, list[bytes]]], rounds: int, batch: int = 64) -> list[str]:
    """nvJPEG through ``torchvision.io.decode_jpeg(device="cuda")`` in batches of ``batch``:
    images/s of the GPU (wall time, synchronised), per JPEG set. Owed where there is no GPU."""
    if not torch.cuda.is_available():
        return ["GPU JPEG decode (`torchvision.io.decode_jpeg(device='cuda')`, nvJPEG): owed "
                "(no GPU in this session; `--rounds 3` on a GPU machine measures it)."]
    import torchvision.io as tio

    rows = []
    for label, data in sets:
        if not (label.startswith("JPEG") or "as JPG" in label):
            continue
        tensors = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in data]
        chunks = [tensors[i:i + batch] for i in range(0, len(tensors), batch)]
        for chunk in chunks:  # warm-up (nvJPEG handles, allocations)
            tio.decode_jpeg(chunk, device="cuda", mode=tio.ImageReadMode.RGB)
        best = float("inf")
        for _ in range(rounds):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for chunk in chunks:
                tio.decode_jpeg(chunk, device="cuda", mode=tio.ImageReadMode.RGB)
            torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        rows.append([label, f"{len(data) / best:.0f}"])
    name = torch.cuda.get_device_name()
    return [f"GPU JPEG decode on {name} (nvJPEG via torchvision.io.decode_jpeg(device='cuda'), "
            f"batches of {batch}, wall time, best of {rounds}):", ""] + markdown_table(
        ["images", "GPU decode img/s"], rows)


def simd_child(args: argparse.Namespace, sets_file: Path) -> list[dict[str, Any]]:
    """Pillow-SIMD's rows from a child process with ``--simd-path`` first on ``sys.path``."""
    env = dict(os.environ, PYTHONPATH=f"{args.simd_path}:{REPO}")
    cmd = [sys.executable, __file__, "--child", str(sets_file), "--size", str(args.size),
           "--rounds", str(args.rounds)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=SHARED)
    parser.add_argument("--size", type=int, default=256, help="DEX preset's view side")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-side", type=int, nargs="+", default=[256, 576],
                        help="pre-shrunk shards' longest sides")
    parser.add_argument("--simd-path", default=None, help="folder with a Pillow-SIMD build")
    parser.add_argument("--target", type=float, default=2300.0, help="images/s to feed")
    parser.add_argument("--cores", type=int, default=16, help="decode cores on the GPU host")
    parser.add_argument("--cpu", type=int, default=None, help="pin to this core")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    if args.child is not None:  # Pillow-SIMD's child: PIL is the SIMD build here
        import PIL

        sets = [(k, [bytes.fromhex(h) for h in v]) for k, v in json.loads(args.child.read_text())]
        rows = measure(sets, pil_decoders(args.size), args.size, args.rounds)
        for r in rows:
            r["decoder"] = f"Pillow-SIMD {PIL.__version__}" + r["decoder"][len("Pillow"):]
        print(json.dumps(rows))
        return
    lines = header("Decode rate per CPU core: candidates for the DEX data path",
                   torch.device("cpu"), python_command())
    sets = load_sets(args.data)
    for side in args.max_side:
        sets += shrunk_sets(args.data, side)
    import PIL

    decoders = {**pil_decoders(args.size), **other_decoders(args.size)}
    rows = measure(sets, decoders, args.size, args.rounds)
    simd_note = "Pillow-SIMD: not measured (no --simd-path)"
    if args.simd_path:
        import tempfile

        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump([(k, [b.hex() for b in v]) for k, v in sets], f)
        try:
            rows += simd_child(args, Path(f.name))
            simd_note = f"Pillow-SIMD from {args.simd_path} (a child process)"
        except subprocess.CalledProcessError as err:
            simd_note = f"Pillow-SIMD: failed to run ({err.stderr.strip().splitlines()[-1]})"
        finally:
            os.unlink(f.name)
    rows.sort(key=lambda r: ([s for s, _ in sets].index(r["set"]), -r["view_img_s"]))
    per_core = args.target / args.cores
    lines += [
        f"* images: {', '.join(f'{label} ({len(d)})' for label, d in sets)}; from {args.data}",
        f"* Pillow {PIL.__version__}, OpenCV {cv2.__version__}, torchvision "
        f"{__import__('torchvision').__version__}, simplejpeg {_version('simplejpeg')}; "
        f"{simd_note}",
        f"* one thread, encoded bytes in memory; images per CPU second of the process "
        f"(process_time); best of {args.rounds} interleaved rounds; "
        f"`+DEX view` = decode then SingleViewTransform({args.size}) (rotate 15, RRC 0.2-1, "
        "bicubic, flip)",
        f"* to feed {args.target:.0f} img/s with {args.cores} cores a core must deliver "
        f"{per_core:.0f} img/s (decode + view); `cores for {args.target:.0f}/s` = "
        f"{args.target:.0f} / (decode + view rate)",
        "",
    ]
    table = [[r["set"], r["decoder"], f"{r['decoded_side']}", f"{r['decode_img_s']:.0f}",
              f"{r['source_mpix_s']:.1f}", f"{r['view_img_s']:.0f}",
              f"{args.target / r['view_img_s']:.1f}"] for r in rows]
    lines += markdown_table(["images", "decoder", "decoded side (px)", "decode img/s",
                             "source MP/s", "+DEX view img/s",
                             f"cores for {args.target:.0f}/s"], table)
    lines += [""] + gpu_lines(sets, args.rounds)
    publish(lines, args.out)


if __name__ == "__main__":
    main()
