"""
The safetensors format read and written with torch alone (no safetensors package): a u64 little-endian header
length N, N bytes of JSON {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}, then the
raw little-endian data (huggingface/safetensors README, "Format"). Used for the SD-VAE (vae.py) and the released
DiffiT weights (diffit_256.safetensors).
"""
import json
import os
import struct

import torch

# the safetensors dtype names that torch has (safetensors/src/tensor.rs Dtype)
SAFETENSORS_DTYPES = {name: getattr(torch, attr) for name, attr in (
    ("F64", "float64"), ("F32", "float32"), ("F16", "float16"), ("BF16", "bfloat16"), ("I64", "int64"),
    ("I32", "int32"), ("I16", "int16"), ("I8", "int8"), ("U8", "uint8"), ("BOOL", "bool"), ("U16", "uint16"),
    ("U32", "uint32"), ("U64", "uint64"), ("C64", "complex64"), ("F8_E5M2", "float8_e5m2"),
    ("F8_E4M3", "float8_e4m3fn")) if hasattr(torch, attr)}
MAX_HEADER_SIZE = 100_000_000  # the reference reader refuses larger headers


def load_safetensors(path):
    """{name: tensor} of a .safetensors file: u64 little-endian header length N, N bytes of JSON
    {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}, then the data, offsets relative
    to byte 8 + N. The file is memory-mapped (copy-on-write) and tensors are views of it; malformed -> ValueError."""
    size = os.path.getsize(path)
    if size < 8:
        raise ValueError(f"{'empty' if size == 0 else f'{size} bytes, shorter than the 8-byte header length'}")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > MAX_HEADER_SIZE:
            raise ValueError(f"header length {n} exceeds the {MAX_HEADER_SIZE:,}-byte limit")
        if 8 + n > size:
            raise ValueError(f"header length {n} runs past the end of the {size}-byte file")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"header is not valid UTF-8 JSON ({e})") from None
    except RecursionError:  # e.g. [[[[...]]]] nested 200,000 deep
        raise ValueError("header JSON is nested too deep (a safetensors header is one flat object)") from None
    if not isinstance(header, dict):
        raise ValueError(f"header is a JSON {type(header).__name__}, not an object")
    if not isinstance(header.pop("__metadata__", {}), dict):
        raise ValueError("__metadata__ is not an object")
    start, data_len = 8 + n, size - 8 - n
    entries = []
    for name, info in header.items():
        if not (isinstance(info, dict) and {"dtype", "shape", "data_offsets"} <= info.keys()):
            raise ValueError(f"tensor {name!r}: needs dtype, shape and data_offsets, got {info!r}")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:  # a list as dtype: not hashable
            raise ValueError(f"tensor {name!r}: unknown or unsupported dtype {dtype!r}")
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise ValueError(f"tensor {name!r}: shape {shape!r} is not a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1] <= data_len):
            raise ValueError(f"tensor {name!r}: data_offsets {offsets!r} outside the {data_len}-byte data")
        nbytes = SAFETENSORS_DTYPES[dtype].itemsize
        for d in shape:
            nbytes *= d
        if offsets[1] - offsets[0] != nbytes:
            raise ValueError(f"tensor {name!r}: shape {shape} of {dtype} needs {nbytes} bytes, "
                             f"data_offsets span {offsets[1] - offsets[0]}")
        entries.append((offsets[0], offsets[1], name, SAFETENSORS_DTYPES[dtype], shape))
    end = 0
    for begin, stop, name, _, _ in sorted(entries, key=lambda e: e[:2]):
        if begin != end:
            what = "overlapping the previous tensor" if begin < end else "leaving a hole after the previous tensor"
            raise ValueError(f"tensor {name!r}: data_offsets start at {begin}, {what} (which ends at {end})")
        end = stop
    if end != data_len:
        raise ValueError(f"the tensors cover {end} bytes of the {data_len}-byte data")
    storage = torch.UntypedStorage.from_file(os.fspath(path), False, size)  # a private (copy-on-write) mmap
    data = torch.empty(0, dtype=torch.uint8).set_(storage)  # (size,) bytes of the file
    out = {}
    for begin, stop, name, dtype, shape in entries:
        raw = data[start + begin:start + stop]
        if (start + begin) % dtype.itemsize:  # not aligned for a typed view: copy this one tensor
            raw = raw.clone()
        out[name] = raw.view(dtype).reshape(shape)
    return out


def save_safetensors(tensors, path, metadata=None):
    """Write {name: tensor} as a .safetensors file (header space-padded to a multiple of 8, as the reference writer),
    atomically: to path + ".tmp<pid>", then renamed."""
    dtypes = {v: k for k, v in SAFETENSORS_DTYPES.items()}
    header, blobs, offset = {}, [], 0
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for name, t in tensors.items():
        if name == "__metadata__" or t.dtype not in dtypes:
            raise ValueError(f"cannot save tensor {name!r} of dtype {t.dtype}")
        blob = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()  # raw bytes, no copy
        header[name] = {"dtype": dtypes[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + blob.size]}
        blobs.append(blob)
        offset += blob.size
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(text)) + text)
            for blob in blobs:
                f.write(blob)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
