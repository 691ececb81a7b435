"""Data loaders: IDX (gz or not), .npz, CSV, JSON lines of v2 requests, named sets."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from slimserve.errors import InvalidArgument, NotFound
from slimserve.optimize.data import (
    FASHION_MNIST,
    digits,
    fashion_mnist,
    load_csv,
    load_data,
    load_idx,
    load_jsonl,
    load_npz,
)


def _idx_bytes(array: np.ndarray) -> bytes:
    code = {np.uint8: 0x08, np.int32: 0x0C, np.float32: 0x0D}[array.dtype.type]
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, ">i4").tobytes()
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


@pytest.mark.parametrize("gz", [False, True])
def test_idx_images_and_labels_beside_them(tmp_path, gz):
    images = np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5)
    labels = np.array([7, 0, 3], np.uint8)
    suffix = ".gz" if gz else ""
    write = gzip.open if gz else open
    with write(tmp_path / f"train-images-idx3-ubyte{suffix}", "wb") as fh:
        fh.write(_idx_bytes(images))
    with write(tmp_path / f"train-labels-idx1-ubyte{suffix}", "wb") as fh:
        fh.write(_idx_bytes(labels))
    x, y = load_data(str(tmp_path / f"train-images-idx3-ubyte{suffix}"))
    assert x.shape == (3, 4, 5) and x.dtype == np.float32
    np.testing.assert_allclose(x * 255, images)
    assert y.tolist() == [7, 0, 3]


def test_idx_other_dtypes_and_bad_files(tmp_path):
    floats = np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3)
    (tmp_path / "f.idx").write_bytes(_idx_bytes(floats))
    np.testing.assert_array_equal(load_idx(tmp_path / "f.idx"), floats)
    (tmp_path / "bad.idx").write_bytes(b"PK\x03\x04rest")
    with pytest.raises(InvalidArgument, match="not an IDX file"):
        load_idx(tmp_path / "bad.idx")
    (tmp_path / "short.idx").write_bytes(_idx_bytes(floats)[:-4])
    with pytest.raises(InvalidArgument, match="truncated"):
        load_idx(tmp_path / "short.idx")
    with pytest.raises(NotFound):
        load_idx(tmp_path / "missing.idx")


def test_npz_with_common_names_and_mismatch(tmp_path):
    np.savez(tmp_path / "d.npz", inputs=np.ones((4, 2), np.float64), labels=[1, 2, 3, 4])
    x, y = load_npz(tmp_path / "d.npz")
    assert x.dtype == np.float32 and y.tolist() == [1, 2, 3, 4]
    np.savez(tmp_path / "e.npz", x=np.ones((4, 2)), y=[1, 2])
    with pytest.raises(InvalidArgument, match="4 inputs but 2 labels"):
        load_npz(tmp_path / "e.npz")
    np.savez(tmp_path / "f.npz", weights=np.ones(3))
    with pytest.raises(InvalidArgument, match="no inputs array"):
        load_npz(tmp_path / "f.npz")


def test_csv_with_and_without_header(tmp_path):
    (tmp_path / "h.csv").write_text("a,label,b\n1,0,2\n3,1,4\n")
    x, y = load_csv(tmp_path / "h.csv")
    assert x.tolist() == [[1, 2], [3, 4]] and y.tolist() == [0, 1]
    (tmp_path / "n.csv").write_text("1,2,5\n3,4,6\n")
    x, y = load_csv(tmp_path / "n.csv", label_column=-1)
    assert x.tolist() == [[1, 2], [3, 4]] and y.tolist() == [5, 6]
    (tmp_path / "bad.csv").write_text("1,2\n3,x\n")
    with pytest.raises(InvalidArgument, match="non-numeric"):
        load_csv(tmp_path / "bad.csv")


def test_jsonl_of_v2_requests(tmp_path):
    lines = [
        {
            "inputs": [
                {"name": "input", "shape": [2, 3], "datatype": "FP32", "data": [1, 2, 3, 4, 5, 6]}
            ],
            "labels": [0, 1],
        },
        {
            "inputs": [{"name": "input", "shape": [1, 3], "datatype": "FP32", "data": [7, 8, 9]}],
            "parameters": {"label": 2},
        },
    ]
    path = tmp_path / "r.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    x, y = load_jsonl(path)
    assert x.shape == (3, 3) and x.dtype == np.float32 and y.tolist() == [0, 1, 2]
    with pytest.raises(InvalidArgument, match="no input other"):
        load_jsonl(path, input_name="other")


def test_digits_splits_and_unknown_formats(tmp_path):
    x, y = digits("train")
    xt, _yt = digits("test")
    assert x.shape[1] == 64 and len(x) + len(xt) == 1797 and x.max() <= 1.0
    assert set(y.tolist()) == set(range(10))
    with pytest.raises(InvalidArgument, match=r"\.npz, \.csv, \.jsonl"):
        load_data(str(tmp_path / "data.parquet"))
    with pytest.raises(InvalidArgument, match="train or test"):
        fashion_mnist("validation")


@pytest.mark.skipif(not FASHION_MNIST.exists(), reason="apt-get install -y dataset-fashion-mnist")
def test_fashion_mnist_test_split():
    x, y = load_data("fashion-mnist:test")
    assert x.shape == (10000, 1, 28, 28) and y.shape == (10000,)
    assert x.min() >= 0.0 and x.max() <= 1.0 and set(np.unique(y).tolist()) == set(range(10))
