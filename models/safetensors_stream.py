"""A ``.safetensors`` file written one tensor at a time, so a writer never holds a file's worth of tensors.

    SafetensorsStream(path, [(name, shape, dtype), …])   header planned from shapes alone, written at once
        .write(name, tensor)                             bytes appended in the planned order, tensor freed by caller
        .close()                                         checks every planned tensor arrived

The format is an 8-byte little-endian header length, a JSON header (name → dtype, shape, byte offsets
into the data; padded with spaces to 8 bytes), then the tensors' bytes back to back. Since the header
needs only shapes and dtypes, it can be written before any tensor exists.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

# torch dtype → the format's dtype name
DTYPE_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
               torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
               torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}


class SafetensorsStream:
    """Write ``specs`` (name, shape, dtype) into ``path`` in that order, one tensor at a time."""

    def __init__(self, path: str | Path, specs: Sequence[tuple[str, Sequence[int], torch.dtype]],
                 metadata: dict[str, str] | None = None) -> None:
        header: dict = {"__metadata__": metadata} if metadata else {}
        offset = 0
        for name, shape, dtype in specs:
            nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
        self.path = Path(path)
        self._pending = [(name, tuple(shape), dtype) for name, shape, dtype in specs]
        self._next = 0
        self._file = open(self.path, "wb")  # noqa: SIM115 (closed by close())
        self._file.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, name: str, tensor: Tensor) -> None:
        """Append ``tensor`` (moved to the CPU in the planned dtype) as the next planned tensor, ``name``.

        Raises:
            ValueError: ``name`` is not the next planned tensor, or its shape differs from the plan.
        """
        if self._next >= len(self._pending):
            raise ValueError(f"{self.path}: {name!r} arrived after every planned tensor was written")
        planned, shape, dtype = self._pending[self._next]
        if name != planned or tuple(tensor.shape) != shape:
            raise ValueError(f"{self.path}: expected {planned!r} {shape} next, got {name!r} {tuple(tensor.shape)}")
        data = tensor.detach().to(device="cpu", dtype=dtype).contiguous()
        self._file.write(data.reshape(-1).view(torch.uint8).numpy().data)
        self._next += 1

    def close(self) -> None:
        """Finish the file.

        Raises:
            ValueError: planned tensors that never arrived (the file is removed: it would be unreadable).
        """
        self._file.close()
        if self._next < len(self._pending):
            self.path.unlink(missing_ok=True)
            raise ValueError(f"{self.path}: the stream ended before {self._pending[self._next][0]!r} "
                             f"({len(self._pending) - self._next} of {len(self._pending)} tensors missing)")
