"""The few ggml symbols fvpatch needs, bound with ctypes on llama-cpp-python's own libggml-base.

Only the head of `struct ggml_tensor` (type, buffer, ne, nb) is mapped: it has been stable for years,
while later fields (name, data, extra) move between versions. Names are read through `ggml_get_name`
and data only through `ggml_backend_tensor_get/set`, so the same code works whether the tensor lives
in host memory, Metal or CUDA.
"""

import ctypes

import numpy as np
from llama_cpp._ggml import libggml

from fvpatch.errors import FvpatchError

TYPE_F32 = 0
TYPE_F16 = 1
TYPE_BF16 = 30
TYPE_NAMES = {TYPE_F32: "f32", TYPE_F16: "f16", TYPE_BF16: "bf16"}
_ITEM_SIZE = {TYPE_F32: 4, TYPE_F16: 2, TYPE_BF16: 2}


class TensorHead(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * 4),
        ("nb", ctypes.c_size_t * 4),
    ]


libggml.ggml_get_name.argtypes = [ctypes.c_void_p]
libggml.ggml_get_name.restype = ctypes.c_char_p
libggml.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
libggml.ggml_backend_tensor_get.restype = None
libggml.ggml_backend_tensor_set.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
libggml.ggml_backend_tensor_set.restype = None

tensor_name = libggml.ggml_get_name


class RowTensor:
    """A computed graph tensor seen as a matrix of rows (one row per token), read and written by row."""

    def __init__(self, ptr: int, name: str):
        head = TensorHead.from_address(ptr)
        self.ptr = ptr
        self.name = name
        self.type = head.type
        self.width = head.ne[0]
        self.n_rows = head.ne[1]
        if self.type not in _ITEM_SIZE:
            raise FvpatchError(f"tensor {name!r} has ggml type {self.type}; only f32, f16 and bf16 rows can be read or written")
        if head.ne[2] != 1 or head.ne[3] != 1:
            raise FvpatchError(f"tensor {name!r} has shape {list(head.ne)}; only 2-D tensors (width x tokens) are supported")
        item = _ITEM_SIZE[self.type]
        if head.nb[0] != item:
            raise FvpatchError(f"tensor {name!r} is not contiguous within a row; it cannot be read by row")
        self.row_bytes = self.width * item
        self.row_stride = head.nb[1]

    def _check_row(self, row: int):
        # A write past the rows the graph allocated corrupts memory and aborts the process.
        if not 0 <= row < self.n_rows:
            raise IndexError(f"row {row} is outside tensor {self.name!r}, which has {self.n_rows} rows")

    def read(self, row: int) -> np.ndarray:
        self._check_row(row)
        raw = np.empty(self.row_bytes, dtype=np.uint8)
        libggml.ggml_backend_tensor_get(self.ptr, raw.ctypes.data, row * self.row_stride, self.row_bytes)
        return _to_f32(raw, self.type)

    def write(self, row: int, values: np.ndarray, add: bool = False):
        """Write `values` over the row, or add them to it."""
        self._check_row(row)
        if values.shape != (self.width,):
            raise FvpatchError(f"vector of width {values.shape[-1]} does not fit tensor {self.name!r} of width {self.width}")
        if add:
            with np.errstate(over="ignore"):  # a sum past float32 turns to inf: the logits check then names it, in one line
                values = self.read(row) + values
        raw = np.ascontiguousarray(_from_f32(values, self.type))
        libggml.ggml_backend_tensor_set(self.ptr, raw.ctypes.data, row * self.row_stride, self.row_bytes)


def _to_f32(raw: np.ndarray, ggml_type: int) -> np.ndarray:
    if ggml_type == TYPE_F32:
        return raw.view(np.float32).copy()
    if ggml_type == TYPE_F16:
        return raw.view(np.float16).astype(np.float32)
    return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)


def _from_f32(values: np.ndarray, ggml_type: int) -> np.ndarray:
    values = np.asarray(values, dtype=np.float32)
    if ggml_type == TYPE_F32:
        return values
    if ggml_type == TYPE_F16:
        return values.astype(np.float16)
    # round to nearest even when narrowing f32 to bf16
    bits = values.view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
