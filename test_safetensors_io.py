"""
safetensors_io.py: the reader against files built byte by byte from the format (every dtype, misaligned tensors,
scalars, empty tensors), the writer's round trip and layout, and a ValueError naming the problem for each malformed
file (hostile headers included: nested deep, wrong types).
"""
import json
import os
import struct

import numpy as np
import pytest
import torch

from safetensors_io import load_safetensors, save_safetensors


def build(path, entries, metadata=None, pad=0, data=None):
    """entries: name -> (dtype string, shape, raw little-endian bytes); tensors laid out in order, no holes."""
    header, blob = {}, b""
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, (dtype, shape, raw) in entries.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(blob), len(blob) + len(raw)]}
        blob += raw
    text = json.dumps(header).encode() + b" " * pad
    path.write_bytes(struct.pack("<Q", len(text)) + text + (blob if data is None else data))
    return path


def bf16_bytes(values):  # exactly representable values: the top 16 bits of their float32 patterns
    return (np.array(values, dtype="<f4").view("<u4") >> 16).astype("<u2").tobytes()


VALUES = [1.5, -2.0, 0.15625, 0.0, 3.0, -0.5]


DTYPES = {  # safetensors name -> (torch dtype, little-endian bytes of VALUES as that dtype)
    "F64": (torch.float64, np.array(VALUES, "<f8").tobytes()),
    "F32": (torch.float32, np.array(VALUES, "<f4").tobytes()),
    "F16": (torch.float16, np.array(VALUES, "<f2").tobytes()),
    "BF16": (torch.bfloat16, bf16_bytes(VALUES)),
    "I64": (torch.int64, np.array(VALUES, "<f8").astype("<i8").tobytes()),
    "I32": (torch.int32, np.array(VALUES, "<f8").astype("<i4").tobytes()),
    "I16": (torch.int16, np.array(VALUES, "<f8").astype("<i2").tobytes()),
    "I8": (torch.int8, np.array(VALUES, "<f8").astype("i1").tobytes()),
    "U8": (torch.uint8, np.array([1, 255, 0, 7, 128, 2], "u1").tobytes()),
    "BOOL": (torch.bool, bytes([1, 0, 0, 1, 1, 0])),
}


def expected_tensor(dtype, raw):
    if dtype == torch.uint8:
        return torch.tensor(list(raw), dtype=torch.uint8).reshape(2, 3)
    if dtype == torch.bool:
        return torch.tensor([bool(b) for b in raw]).reshape(2, 3)
    return torch.tensor(VALUES, dtype=torch.float64).to(dtype).reshape(2, 3)


@pytest.mark.parametrize("pad", [0, 1, 7])  # pad 1 misaligns every tensor: the reader copies instead of viewing
def test_safetensors_byte_by_byte(pad, tmp_path):
    entries = {f"t_{name}": (name, [2, 3], raw) for name, (_, raw) in DTYPES.items()}
    entries["scalar"] = ("F32", [], struct.pack("<f", 3.25))
    entries["empty"] = ("F16", [0, 3], b"")
    entries["last"] = ("I32", [1], struct.pack("<i", -9))
    out = load_safetensors(build(tmp_path / "a.safetensors", entries, {"format": "pt"}, pad=pad))
    assert set(out) == set(entries)
    for name, (dtype, raw) in DTYPES.items():
        t = out[f"t_{name}"]
        assert t.dtype == dtype and torch.equal(t, expected_tensor(dtype, raw)), name
    assert out["scalar"].shape == () and out["scalar"].item() == 3.25
    assert out["empty"].shape == (0, 3) and out["empty"].dtype == torch.float16
    assert out["last"].tolist() == [-9]


def test_save_safetensors_round_trip_and_layout(tmp_path):
    tensors = {f"t_{name}": expected_tensor(dtype, raw) for name, (dtype, raw) in DTYPES.items()}
    tensors.update(scalar=torch.tensor(2.5, dtype=torch.float64), empty=torch.zeros(3, 0),
                   strided=torch.arange(12.0).reshape(3, 4).t())
    path = tmp_path / "b.safetensors"
    save_safetensors(tensors, str(path), metadata={"format": "pt"})
    assert os.listdir(tmp_path) == ["b.safetensors"]  # no temporary file left
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    assert n % 8 == 0 and header["__metadata__"] == {"format": "pt"} and header["t_BF16"]["dtype"] == "BF16"
    begin, end = header["t_F32"]["data_offsets"]
    assert raw[8 + n + begin:8 + n + end] == DTYPES["F32"][1]  # the bytes are the format's, not torch's pickle
    back = load_safetensors(path)
    assert list(back) == list(tensors)
    for k, t in tensors.items():
        assert back[k].dtype == t.dtype and back[k].shape == t.shape and torch.equal(back[k], t), k
    # tensors are views of one copy-on-write mapping of the whole file: writing to them leaves the file alone
    assert back["t_F32"].untyped_storage().nbytes() == len(raw)
    back["t_F32"][0, 0] = 99.0
    assert load_safetensors(path)["t_F32"][0, 0] == 1.5 and path.read_bytes() == raw


F32_4 = struct.pack("<f", 1.0)


MALFORMED = {  # name -> (file bytes, what the message says)
    "empty": (b"", "empty"),
    "short": (b"\x05\x00\x00", "shorter than the 8-byte"),
    "header past the end": (struct.pack("<Q", 1000) + b"{}", "past the end"),
    "header too large": (struct.pack("<Q", 100_000_001) + b"{}", "exceeds the 100,000,000-byte limit"),
    "invalid JSON": (struct.pack("<Q", 3) + b"{x}", "not valid UTF-8 JSON"),
    "not UTF-8": (struct.pack("<Q", 2) + b"\xff\xfe", "not valid UTF-8 JSON"),
    "not an object": (struct.pack("<Q", 2) + b"[]", "not an object"),
}


def header_file(header, data):
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def entry(dtype="F32", shape=(1,), offsets=(0, 4)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


MALFORMED.update({
    "unknown dtype": (header_file({"a": entry(dtype="F7")}, F32_4), "unknown or unsupported dtype"),
    "missing field": (header_file({"a": {"dtype": "F32", "shape": [1]}}, F32_4), "needs dtype, shape and data_offsets"),
    "bad shape": (header_file({"a": entry(shape=(-1,))}, F32_4), "not a list of non-negative integers"),
    "size mismatch": (header_file({"a": entry(shape=(2,))}, F32_4), "needs 8 bytes, data_offsets span 4"),
    "outside the data": (header_file({"a": entry(shape=(2,), offsets=(0, 8))}, F32_4), "outside the 4-byte data"),
    "overlap": (header_file({"a": entry(shape=(2,), offsets=(0, 8)), "b": entry(shape=(2,), offsets=(4, 12))},
                            F32_4 * 3), "overlapping"),
    "hole": (header_file({"a": entry(), "b": entry(offsets=(8, 12))}, F32_4 * 3), "hole"),
    "trailing bytes": (header_file({"a": entry()}, F32_4 * 2), "cover 4 bytes of the 8-byte data"),
    "metadata not an object": (header_file({"__metadata__": [1], "a": entry()}, F32_4), "__metadata__"),
    # hostile headers: nested 200,000 deep (json's RecursionError), a list as dtype (unhashable), bools as numbers
    "nested deep": (struct.pack("<Q", 400_000) + b"[" * 200_000 + b"]" * 200_000, "nested too deep"),
    "dtype a list": (header_file({"a": entry(dtype=["F32"])}, F32_4), r"unsupported dtype \['F32'\]"),
    "dtype an object": (header_file({"a": {**entry(), "dtype": {"F32": 1}}}, F32_4), "unsupported dtype"),
    "shape of bools": (header_file({"a": entry(shape=(True,))}, F32_4), "not a list of non-negative integers"),
    "offsets of floats": (header_file({"a": entry(offsets=(0.0, 4.0))}, F32_4), "outside the 4-byte data"),
    "tensor not an object": (header_file({"a": [1, 2]}, F32_4), "needs dtype, shape and data_offsets"),
})


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_safetensors(case, tmp_path):
    data, message = MALFORMED[case]
    path = tmp_path / "bad.safetensors"
    path.write_bytes(data)
    with pytest.raises(ValueError, match=message):
        load_safetensors(path)
