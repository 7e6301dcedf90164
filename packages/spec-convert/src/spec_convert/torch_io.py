"""`.bin`/`.pt` state dicts, read with `torch.load(weights_only=True)` and handed on as numpy arrays.

The only module of spec-convert that imports torch (inside the function): safetensors inputs never load it.
`weights_only=True` restricts unpickling to tensors and plain containers, so a file holding arbitrary
Python objects (a training state, an optimizer) is refused instead of executed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from spec_format.errors import SpecError
from spec_format.tensors import bf16_bits_to_float32

# torch dtype name -> safetensors dtype name (how the source stored each tensor).
_DTYPE_NAMES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
}  # fmt: skip


def load_torch_state_dict(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """({name: array}, {name: safetensors dtype}) of a flat {name: tensor} file. BF16 comes back as float32
    (exact), like spec_format.tensors.load_tensors."""
    try:
        import torch
    except ImportError:
        raise SpecError(
            f"{path}: reading .bin/.pt files needs torch; install it with pip install 'spec-convert[torch]' "
            "or convert the file to safetensors first"
        ) from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError... for bad files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SpecError(
            f"{path}: cannot be read as a plain tensor file with torch.load(weights_only=True) ({first}); "
            "spec convert never unpickles other objects: export the draft's state dict first"
        ) from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        kinds = sorted({type(v).__name__ for v in state.values()}) if isinstance(state, dict) else []
        raise SpecError(
            f"{path}: expected a flat {{name: tensor}} state dict, found {type(state).__name__}"
            + (f" holding {', '.join(kinds)}" if kinds else "")
            + "; save the draft's state_dict() alone"
        )
    tensors, dtypes = {}, {}
    for name, t in state.items():
        dtype = str(t.dtype).removeprefix("torch.")
        if dtype not in _DTYPE_NAMES:
            raise SpecError(f"{path}: tensor '{name}' has dtype {dtype}, which spec convert cannot read")
        t = t.detach().contiguous()
        if dtype == "bfloat16":
            # numpy has no bfloat16: take the raw 16 bits and widen them exactly
            tensors[name] = bf16_bits_to_float32(t.view(torch.int16).numpy().view(np.uint16))
        else:
            tensors[name] = t.numpy()
        dtypes[name] = _DTYPE_NAMES[dtype]
    return tensors, dtypes
