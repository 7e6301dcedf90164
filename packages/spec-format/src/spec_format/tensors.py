"""safetensors files with numpy alone, bf16 included.

The layout (https://github.com/huggingface/safetensors): 8-byte little-endian header length N, N bytes of
JSON header {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}, then the
raw little-endian tensor bytes. numpy has no bfloat16, which is why the safetensors package's numpy API
cannot write or read BF16: this module does both, and its files read back with the safetensors package
(numpy or torch) unchanged. bf16 arrays are held as float32 in memory (exact upcast) and rounded to
nearest-even on writing.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np

from spec_format.errors import SpecError

# safetensors dtype name -> numpy storage dtype (BF16 is stored as its raw 16 bits).
_STORAGE = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": np.uint16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
_NAME_OF = {np.dtype(v): k for k, v in _STORAGE.items() if k != "BF16"}
DTYPE_ALIASES = {
    "bfloat16": "BF16",
    "float16": "F16",
    "float32": "F32",
    "bf16": "BF16",
    "fp16": "F16",
    "fp32": "F32",
}


def float32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bit patterns (uint16), rounding to nearest even like torch's .to(torch.bfloat16)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    u = x.view(np.uint32)
    bits = ((u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
    bits[np.isnan(x)] = 0x7FC0  # a quiet NaN stays NaN (the rounding add could carry it to inf)
    return bits


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """bf16 bit patterns (uint16) -> float32, exactly."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def read_header(path: str | Path) -> tuple[dict, dict, int]:
    """({name: {"dtype", "shape", "data_offsets"}}, metadata, data start) of a safetensors file, checked
    against the file size so a truncated file is reported here rather than as a short read later."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise SpecError(
                    f"{path}: truncated safetensors file ({size} bytes); re-create or re-download it"
                )
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100_000_000:
                raise SpecError(
                    f"{path}: header length {n} exceeds the file size {size}; the file is truncated or not safetensors"
                )
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise SpecError(f"{path}: file not found") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise SpecError(f"{path}: the safetensors header is not valid JSON; the file is corrupted") from None
    if not isinstance(header, dict):
        raise SpecError(f"{path}: the safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    start = 8 + n
    for name, info in header.items():
        try:
            begin, end = info["data_offsets"]
            dtype, shape = info["dtype"], [int(d) for d in info["shape"]]
        except (KeyError, TypeError, ValueError):
            raise SpecError(f"{path}: tensor '{name}' has a malformed header entry {info!r}") from None
        if dtype not in _STORAGE:
            raise SpecError(
                f"{path}: tensor '{name}' has dtype {dtype}, which is not supported ({sorted(_STORAGE)})"
            )
        expected = int(np.prod(shape, dtype=np.int64)) * np.dtype(_STORAGE[dtype]).itemsize
        if end - begin != expected:
            raise SpecError(
                f"{path}: tensor '{name}' {dtype}{shape} needs {expected} bytes, header says {end - begin}"
            )
        if start + end > size:
            raise SpecError(
                f"{path}: tensor '{name}' ends at byte {start + end} but the file has {size}; the file is truncated"
            )
    return header, metadata, start


def load_tensors(path: str | Path, upcast_bf16: bool = True) -> dict[str, np.ndarray]:
    """All tensors of a safetensors file as numpy arrays (BF16 as float32 unless upcast_bf16=False, then
    as the raw uint16 bits). Uses a memory map: untouched tensors cost no reading."""
    header, _, start = read_header(path)
    data = np.memmap(path, dtype=np.uint8, mode="r")
    out = {}
    for name, info in header.items():
        begin, end = info["data_offsets"]
        arr = data[start + begin : start + end].view(_STORAGE[info["dtype"]]).reshape(info["shape"])
        if info["dtype"] == "BF16" and upcast_bf16:
            arr = bf16_bits_to_float32(arr)
        out[name] = arr
    return out


def tensor_dtypes(path: str | Path) -> dict[str, str]:
    """{name: safetensors dtype name} from the header alone."""
    return {name: info["dtype"] for name, info in read_header(path)[0].items()}


def save_tensors(
    path: str | Path,
    tensors: dict[str, np.ndarray],
    float_dtype: str | None = None,
    dtypes: dict[str, str] | None = None,
    metadata: dict[str, str] | None = None,
) -> None:
    """Write `tensors` to `path` atomically (temporary file, fsync, rename).

    float_dtype ("BF16", "F16", "F32" or an alias) converts every floating-point tensor; `dtypes` sets it
    per tensor and wins over float_dtype. Integer and bool tensors are written as they are.
    """
    path = Path(path)
    dtypes = {k: DTYPE_ALIASES.get(v, v) for k, v in (dtypes or {}).items()}
    float_dtype = DTYPE_ALIASES.get(float_dtype, float_dtype) if float_dtype else None
    header: dict = {}
    blobs = []
    offset = 0
    for name in sorted(tensors):
        arr = np.asarray(tensors[name])
        want = dtypes.get(name) or (float_dtype if arr.dtype.kind == "f" else None) or _NAME_OF.get(arr.dtype)
        if want is None:
            raise SpecError(f"tensor '{name}': numpy dtype {arr.dtype} cannot be stored in safetensors")
        if want == "BF16":
            raw = float32_to_bf16_bits(arr)
        else:
            raw = np.ascontiguousarray(arr, dtype=_STORAGE[want])
        blob = raw.tobytes()
        header[name] = {"dtype": want, "shape": list(arr.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # tensor data starts 8-byte aligned
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for blob in blobs:
            f.write(blob)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
