"""`mnist-ddp predict CKPT FILE...`: digits in files, classified by a trained model.

    mnist-ddp predict runs/<id> digit.png scans/ --invert --top-k 3
    mnist-ddp predict runs/<id> batch.npy t10k-images-idx3-ubyte --format csv --out preds.csv

Each file is recognised by its content, not its name:

- an image (PNG, JPEG, or anything Pillow reads), of any size and mode.  A 28x28 image
  is used as it is: it already is MNIST's format.  Any other size is brought to that
  format the way the MNIST digits themselves were made (LeCun et al.): the paper's
  level (the median pixel) becomes black, the ink's bounding box (pixels above
  INK_LEVEL of the brightest) is cropped, scaled with anti-aliasing and its aspect
  ratio kept to fit a 20x20 box, and pasted into a black 28x28 image so that its
  centre of mass lies at the centre (rounded to a pixel, kept inside the frame).
  MNIST digits are white on black: ``--invert`` for dark ink on light paper (scans,
  drawings).  Transparent pixels count as paper.
- a .npy array: one image (H x W) or a batch (N x H x W, N x 1 x H x W), uint8 0..255
  or floats in 0..1 (a float array whose maximum exceeds 1 is read as 0..255).
- an IDX file (MNIST's own format, also gzipped): every image in it.
- a folder: its files with the suffixes in FOLDER_SUFFIXES, in name order.

All images go through the model together in batches (``--batch-size``), in the precision the
run computed in (``--precision auto``, the default: its evaluation's numerics, so predict
and evaluate agree image for image), or the one given.  Output, on
stdout or to ``--out``: per image its file, index in the file, and the top-k classes
with their probabilities, as JSON (a list of objects) or CSV.  A file that cannot
be read is one line on stderr and the others are still predicted; the exit code is
1 if any failed, 2 for bad usage.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import json
import struct
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from cnn import console, precision
from cnn.checkpoint import CheckpointError
from cnn.files import write_atomic
from cnn.inference import load_model, logits

SIZE, BOX = 28, 20  # MNIST: a 28x28 frame, the digit scaled to fit 20x20 inside it
INK_LEVEL = 0.1  # a pixel is ink if brighter than this fraction of the brightest (above the paper level)
FOLDER_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".npy", ".idx", ".gz")


class InputError(ValueError):
    """A file that cannot be predicted; the message says why, in one line."""


# ---------------------------------------------------------------- MNIST-style centring


def to_mnist(gray: np.ndarray) -> np.ndarray:
    """float H x W, white ink on black, 0..255 -> uint8 28 x 28 in MNIST's format (see the module doc)."""
    if gray.shape == (SIZE, SIZE):
        return np.clip(np.rint(gray), 0, 255).astype(np.uint8)
    from PIL import Image

    paper = np.median(gray)
    ink = np.clip(gray - paper, 0, None)
    top = ink.max()
    if top <= 0:
        hint = " (dark ink on light paper? use --invert)" if paper > 127 else ""
        raise InputError(f"no light digit on a dark background found{hint}")
    rows, cols = np.nonzero(ink > INK_LEVEL * top)
    crop = ink[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1] * (255.0 / top)
    h, w = crop.shape
    scale = BOX / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))  # PIL sizes are (width, height)
    small = np.asarray(Image.fromarray(crop.astype(np.float32)).resize(size, Image.Resampling.LANCZOS))  # mode F
    small = np.clip(small, 0, 255)  # Lanczos rings slightly past the input's range
    mass = small.sum()
    if mass <= 0:
        raise InputError("no digit found (the image is blank)")
    ys, xs = np.indices(small.shape)
    cy, cx = (ys * small).sum() / mass, (xs * small).sum() / mass
    # MNIST's own test digits have their centre of mass at row 13.99, column 14.01 (std 0.29) in
    # pixel-index coordinates: measured here, so the target is 14.0, not 13.5
    centre = SIZE / 2
    top_row = int(np.clip(round(centre - cy), 0, SIZE - small.shape[0]))
    left = int(np.clip(round(centre - cx), 0, SIZE - small.shape[1]))
    out = np.zeros((SIZE, SIZE), dtype=np.float32)
    out[top_row : top_row + small.shape[0], left : left + small.shape[1]] = small
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------- readers: file -> uint8 N x 28 x 28


def _image(data: bytes, invert: bool) -> np.ndarray:
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data))
        img.load()
        img = ImageOps.exif_transpose(img)
    except UnidentifiedImageError:
        raise InputError("not an image, .npy or IDX file") from None
    except (OSError, ValueError, SyntaxError) as exc:  # truncated or corrupt image data
        raise InputError(f"unreadable image ({str(exc).splitlines()[0][:120]})") from None
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):  # 16-bit grayscale
        gray = np.asarray(img, dtype=np.float64) * (255.0 / 65535.0)
    else:
        if "A" in img.getbands() or "transparency" in img.info:  # transparent = paper
            rgba = img.convert("RGBA")
            paper = Image.new("RGBA", rgba.size, (255, 255, 255, 255) if invert else (0, 0, 0, 255))
            img = Image.alpha_composite(paper, rgba)
        gray = np.asarray(img.convert("L"), dtype=np.float64)
    return to_mnist(255.0 - gray if invert else gray)[None]


def _array(arr: np.ndarray, invert: bool) -> np.ndarray:
    """A 2-D image or a 3-D/4-D batch of pixel values -> uint8 N x 28 x 28."""
    if arr.ndim == 4 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or 0 in arr.shape:
        raise InputError(f"array of shape {tuple(arr.shape)}: expected H x W, N x H x W or N x 1 x H x W")
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise InputError(f"array of dtype {arr.dtype}: expected integers or floats")
    values = arr.astype(np.float64)
    if values.min() < 0 or values.max() > 255 or not np.isfinite(values).all():
        raise InputError("values outside 0..255 (pass raw pixels: uint8 0..255 or floats 0..1, not normalized)")
    if np.issubdtype(arr.dtype, np.floating) and values.max() <= 1.0:
        values = values * 255.0
    if invert:
        values = 255.0 - values
    return np.stack([to_mnist(img) for img in values])


def _idx(data: bytes) -> np.ndarray:
    ndim = data[3]
    if data[2] != 0x08:
        raise InputError(f"an IDX file of type {data[2]:#x}, not unsigned bytes")
    if ndim == 1:
        raise InputError("an IDX file of labels (one dimension), not images")
    if ndim not in (2, 3) or len(data) < 4 + 4 * ndim:
        raise InputError(f"an IDX file with {ndim} dimensions: expected images (N x H x W)")
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = data[4 + 4 * ndim :]
    if len(body) != int(np.prod(dims)):
        raise InputError(f"IDX header says {'x'.join(map(str, dims))} but the file holds {len(body)} bytes (truncated?)")
    return np.frombuffer(body, dtype=np.uint8).reshape(dims)


def read_images(path: Path, invert: bool = False) -> np.ndarray:
    """uint8 N x 28 x 28 from one file (an image, .npy or IDX), or InputError."""
    try:
        data = path.read_bytes()
    except IsADirectoryError:
        raise InputError("is a folder") from None
    except OSError as exc:
        raise InputError(exc.strerror or str(exc)) from None
    if not data:
        raise InputError("empty file")
    if data[:2] == b"\x1f\x8b":  # gzip: MNIST's IDX files are published gzipped
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as exc:
            raise InputError(f"corrupt gzip ({exc})") from None
    if data[:6] == b"\x93NUMPY":
        try:
            arr = np.load(io.BytesIO(data), allow_pickle=False)
        except ValueError as exc:
            raise InputError(f"unreadable .npy ({str(exc).splitlines()[0][:120]})") from None
        return _array(arr, invert)
    if len(data) >= 4 and data[:2] == b"\x00\x00" and data[2] in (0x08, 0x09, 0x0B, 0x0C, 0x0D, 0x0E):
        return _array(_idx(data), invert)
    return _image(data, invert)


def expand(paths: Sequence[Path]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Files to read (a folder's FOLDER_SUFFIXES files in name order), and (path, error) for
    arguments that give none."""
    files, errors = [], []
    for p in paths:
        if p.is_dir():
            inside = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in FOLDER_SUFFIXES)
            if not inside:
                errors.append((p, f"empty folder: no {', '.join(FOLDER_SUFFIXES)} files"))
            files += inside
        else:
            files.append(p)
    return files, errors


# ---------------------------------------------------------------- output


def rows(names: list[tuple[str, int]], logits: torch.Tensor, k: int) -> list[dict[str, Any]]:
    """Per image its top-k classes by logit and their probabilities.  Equal logits (bf16 rounds
    them together) rank the lower class first, as the evaluation's argmax does: topk does not
    promise an order among ties, a stable sort does."""
    probs = torch.softmax(logits.float(), dim=1)
    top_c = logits.sort(dim=1, descending=True, stable=True).indices[:, :k]
    top_p = probs.gather(1, top_c)
    return [{"file": f, "index": i, "classes": c, "probabilities": [round(p, 6) for p in ps]}
            for (f, i), c, ps in zip(names, top_c.tolist(), top_p.tolist())]


def render(records: list[dict[str, Any]], fmt: str, k: int) -> str:
    if fmt == "json":
        return "[\n" + ",\n".join(json.dumps(r) for r in records) + "\n]\n"
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["file", "index"] + [f"{what}_{j}" for j in range(1, k + 1) for what in ("class", "probability")])
    for r in records:
        writer.writerow([r["file"], r["index"]] + [v for pair in zip(r["classes"], r["probabilities"]) for v in pair])
    return buf.getvalue()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mnist-ddp predict",
        description="Classify digits in images, .npy arrays or IDX files with a trained checkpoint.",
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("checkpoint", metavar="CKPT|RUN_DIR", help="a checkpoint file, or a run folder (its newest)")
    parser.add_argument("files", nargs="+", type=Path, metavar="FILE", help="images, .npy, IDX files or folders")
    parser.add_argument("--top-k", type=int, default=3, choices=range(1, 11), metavar="K",
                        help="classes per image, most probable first (1..10, default 3)")
    parser.add_argument("--format", choices=("json", "csv"), help="output format (default: --out's suffix, else json)")
    parser.add_argument("--out", type=Path, help="write here (atomically) instead of stdout")
    parser.add_argument("--invert", action="store_true", help="dark ink on light paper: invert before centring")
    parser.add_argument("--batch-size", type=int, default=1000, help="images per forward pass (default 1000)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    parser.add_argument("--precision", default="auto", choices=("auto", *precision.NAMES),
                        help="auto (default): the one the run computed in, recorded in its checkpoint")
    args = parser.parse_args(argv)
    fmt = args.format or ("csv" if args.out is not None and args.out.suffix.lower() == ".csv" else "json")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    try:
        trained = load_model(args.checkpoint, args.device)
    except (CheckpointError, RuntimeError) as exc:  # RuntimeError: an unusable --device
        console.error(exc)
        return 1

    files, failed = expand(args.files)
    batches, names = [], []
    for path in files:
        try:
            images = read_images(path, args.invert)
        except InputError as exc:
            failed.append((path, str(exc)))
            continue
        batches.append(torch.from_numpy(images))
        names += [(str(path), i) for i in range(len(images))]
    for path, msg in failed:
        console.error(f"{path}: {msg}")
    if not batches:
        return 1
    name, why = precision.for_trained(args.precision, trained.precision, trained.precision_source)
    prec = precision.build(name, next(trained.model.parameters()).device, why)
    out = logits(trained.model, trained.config, torch.cat(batches), args.batch_size, prec.autocast)
    text = render(rows(names, out, args.top_k), fmt, args.top_k)
    done = f"{len(names)} image(s) from {len(batches)} file(s), precision {prec.name} ({prec.reason})"
    if args.out is not None:
        write_atomic(args.out, text)
        console.say(f"{done} -> {args.out}")
    else:
        sys.stdout.write(text)
        console.note(done)  # stdout holds the predictions only
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
