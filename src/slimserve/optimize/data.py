"""Data for calibration, fine-tuning and evaluation: (inputs, labels) numpy arrays.

Formats: IDX (MNIST-style, gzipped or not), `.npz`, CSV, JSON lines of KServe v2 requests;
named sets: `fashion-mnist[:train|:test]` (Debian package dataset-fashion-mnist) and
`digits` (scikit-learn's bundled 8x8 digits). `load_data(spec)` picks by name or suffix.
Inputs come back float32 (pixels scaled to [0, 1]); labels int64, or None when absent.
"""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path
from typing import Any

import numpy as np

from slimserve.errors import InvalidArgument, NotFound

Arrays = tuple[np.ndarray, np.ndarray | None]

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
# IDX type codes -> numpy big-endian dtypes (the format's header byte 3).
_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_V2_TYPES = {
    "FP32": np.float32,
    "FP64": np.float64,
    "FP16": np.float16,
    "INT64": np.int64,
    "INT32": np.int32,
    "INT16": np.int16,
    "INT8": np.int8,
    "UINT8": np.uint8,
    "BOOL": np.bool_,
}


def _open(path: Path) -> bytes:
    if not path.is_file():
        raise NotFound(f"data file {path} does not exist")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        return fh.read()


def load_idx(path: str | Path) -> np.ndarray:
    """An IDX file (e.g. train-images-idx3-ubyte[.gz]) as an array of its declared shape."""
    path = Path(path)
    raw = _open(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise InvalidArgument(f"{path}: not an IDX file (bad magic number {raw[:4].hex()})")
    ndim = raw[3]
    dims = tuple(int(d) for d in np.frombuffer(raw, ">i4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_TYPES[raw[2]])
    expected = int(np.prod(dims)) * dtype.itemsize
    body = raw[4 + 4 * ndim :]
    if len(body) != expected:
        raise InvalidArgument(
            f"{path}: header says {dims} ({expected} bytes), file holds "
            f"{len(body)} bytes; the file is truncated or not IDX"
        )
    return np.frombuffer(body, dtype).reshape(dims).astype(dtype.newbyteorder("="))


def load_idx_pair(images: str | Path, labels: str | Path | None = None) -> Arrays:
    """IDX images scaled to float32 [0, 1] (uint8 input) and int64 labels."""
    x = load_idx(images)
    x = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)
    y = None if labels is None else load_idx(labels).astype(np.int64)
    _check_pair(x, y, str(images))
    return x, y


def fashion_mnist(split: str = "train", root: Path = FASHION_MNIST) -> Arrays:
    """Fashion-MNIST as (N, 1, 28, 28) float32 in [0, 1] and int64 labels."""
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise InvalidArgument(f"fashion-mnist split {split!r} is unknown; use train or test")
    images = root / f"{prefix}-images-idx3-ubyte.gz"
    if not images.exists():
        raise NotFound(f"{images} is missing; install it: apt-get install -y dataset-fashion-mnist")
    x, y = load_idx_pair(images, root / f"{prefix}-labels-idx1-ubyte.gz")
    return x[:, None], y


def digits(split: str = "all", test_fraction: float = 0.25) -> Arrays:
    """scikit-learn's 8x8 digits: (N, 64) float32 in [0, 1], int64 labels; split train|test|all."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.data / 16.0).astype(np.float32)
    y = bunch.target.astype(np.int64)
    cut = int(len(x) * (1.0 - test_fraction))
    if split == "all":
        return x, y
    if split in ("train", "test"):
        return (x[:cut], y[:cut]) if split == "train" else (x[cut:], y[cut:])
    raise InvalidArgument(f"digits split {split!r} is unknown; use train, test or all")


def load_npz(path: str | Path, inputs: str | None = None, labels: str | None = None) -> Arrays:
    """Arrays from a .npz: inputs under x|inputs|data (or `inputs`), labels under y|labels."""
    path = Path(path)
    if not path.is_file():
        raise NotFound(f"data file {path} does not exist")
    with np.load(path, allow_pickle=False) as npz:
        keys = list(npz.keys())
        xk = inputs or next((k for k in ("x", "inputs", "input", "data", "X") if k in keys), None)
        if xk is None or xk not in keys:
            raise InvalidArgument(f"{path}: no inputs array; found {keys}; name it 'x' or 'inputs'")
        yk = labels or next((k for k in ("y", "labels", "label", "target") if k in keys), None)
        x = npz[xk]
        y = npz[yk].astype(np.int64) if yk in keys else None
    x = x.astype(np.float32) if x.dtype.kind == "f" else x
    _check_pair(x, y, str(path))
    return x, y


def load_csv(path: str | Path, label_column: str | int | None = "label") -> Arrays:
    """Numeric CSV rows; the column named `label_column` (or at that index) is the label.

    A header row is detected when its first field is not a number.
    """
    path = Path(path)
    with path.open(newline="") as fh:
        rows = [r for r in csv.reader(fh) if r]
    if not rows:
        raise InvalidArgument(f"{path}: empty CSV")
    header = None if _is_number(rows[0][0]) else rows.pop(0)
    try:
        table = np.asarray(rows, dtype=np.float64)
    except ValueError as exc:
        raise InvalidArgument(f"{path}: non-numeric or ragged CSV rows ({exc})") from None
    col = _label_index(label_column, header, table.shape[1], path)
    if col is None:
        return table.astype(np.float32), None
    y = table[:, col].astype(np.int64)
    return np.delete(table, col, axis=1).astype(np.float32), y


def _label_index(
    label: str | int | None, header: list[str] | None, width: int, path: Path
) -> int | None:
    if label is None:
        return None
    if isinstance(label, int):
        return label % width
    if header is not None and label in header:
        return header.index(label)
    return None


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def load_jsonl(path: str | Path, input_name: str | None = None) -> Arrays:
    """JSON lines of v2 infer requests; one input tensor stacked along the batch dimension.

    A label may sit at the top level ("label"/"labels") or in "parameters". Each request's
    tensor keeps its batch dimension, so requests of several rows concatenate.
    """
    path = Path(path)
    xs: list[np.ndarray] = []
    ys: list[np.ndarray | None] = []
    with path.open() as fh:
        for lineno, line in enumerate(fh, 1):
            if line.strip():
                x, y = _v2_request(json.loads(line), input_name, f"{path}:{lineno}")
                xs.append(x)
                ys.append(y)
    if not xs:
        raise InvalidArgument(f"{path}: no requests in the file")
    known = [y for y in ys if y is not None]
    labels = np.concatenate(known).astype(np.int64) if len(known) == len(ys) else None
    return np.concatenate(xs), labels


def _v2_request(
    req: dict[str, Any], name: str | None, where: str
) -> tuple[np.ndarray, np.ndarray | None]:
    tensors = req.get("inputs") or []
    tensor = next((t for t in tensors if name is None or t.get("name") == name), None)
    if tensor is None:
        raise InvalidArgument(
            f"{where}: no input {name or ''} in the request; "
            "each line must be a v2 request with 'inputs'"
        )
    dtype = _V2_TYPES.get(str(tensor.get("datatype", "FP32")).upper())
    if dtype is None:
        raise InvalidArgument(f"{where}: datatype {tensor.get('datatype')!r} is not numeric")
    x = np.asarray(tensor["data"], dtype=dtype).reshape(tensor["shape"])
    label = req.get("label", req.get("labels", (req.get("parameters") or {}).get("label")))
    y = None if label is None else np.atleast_1d(np.asarray(label))
    return x, y


def _check_pair(x: np.ndarray, y: np.ndarray | None, where: str) -> None:
    if y is not None and len(y) != len(x):
        raise InvalidArgument(f"{where}: {len(x)} inputs but {len(y)} labels; they must match")


def load_data(spec: str | Path) -> Arrays:
    """Load by name or suffix: fashion-mnist[:split], digits[:split], .npz, .csv, .jsonl,
    an IDX images file (labels found beside it by the MNIST naming), or a folder of IDX files."""
    text = str(spec)
    name, _, split = text.partition(":")
    if name == "fashion-mnist":
        return fashion_mnist(split or "train")
    if name == "digits":
        return digits(split or "all")
    path = Path(text)
    suffixes = "".join(path.suffixes)
    if path.suffix == ".npz":
        return load_npz(path)
    if path.suffix == ".csv":
        return load_csv(path)
    if path.suffix in (".jsonl", ".ndjson"):
        return load_jsonl(path)
    if "idx" in suffixes or "idx" in path.name:
        return load_idx_pair(path, _labels_beside(path))
    raise InvalidArgument(
        f"data {text!r}: unknown format; give a .npz, .csv, .jsonl, an IDX file "
        "(*-images-idx3-ubyte[.gz]), fashion-mnist[:train|:test] or digits[:train|:test]"
    )


def _labels_beside(images: Path) -> Path | None:
    candidate = images.with_name(images.name.replace("images-idx3", "labels-idx1"))
    return candidate if candidate != images and candidate.exists() else None


TEXT_SUFFIXES = (".txt", ".md", ".text")


def load_text(spec: str | Path) -> str:
    """A plain UTF-8 text file (.txt, .md, .text): held-out text for a language model."""
    path = Path(spec)
    if path.suffix not in TEXT_SUFFIXES:
        raise InvalidArgument(
            f"data {str(spec)!r}: a language model takes a plain text file "
            f"({', '.join(TEXT_SUFFIXES)}); give one, or leave --eval-data out to use the "
            "held-out text that ships with slimserve"
        )
    raw = _open(path)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        where = f"{exc.reason} at byte {exc.start}"
        raise InvalidArgument(f"{path}: not UTF-8 text ({where})") from None
    if not text.strip():
        raise InvalidArgument(f"{path}: the text is empty")
    return text
