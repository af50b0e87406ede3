"""Lossless coding of stored tensors: byte grouping + zstd (as in ZipNN, Hershcovitch et al. 2024).

A tensor of element size s bytes is viewed as (n, s) bytes and split into s byte planes (plane j holds
byte j of every element: for float16 the low mantissa bytes in one plane, sign + exponent + high
mantissa in the other, whose skewed distribution zstd codes well); each plane is compressed on its
own, or kept raw where zstd would not shrink it. The coded tensor is one uint8 blob (the planes back
to back) plus a small JSON entry {dtype, shape, planes: [[codec, bytes], ...]}; zstd frames carry a
checksum, so a damaged coded plane is an error, not silent garbage. Decoding is exact:
the same bytes, dtype and shape. Compression is single-threaded, so the same input and level give
the same blob.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import UserError

CODEC = "bytegroup-zstd"
_DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float16, torch.bfloat16, torch.float32,
                                                      torch.float64, torch.uint8, torch.int8,
                                                      torch.int16, torch.int32, torch.int64, torch.bool)}


def _zstd():
    try:
        import zstandard
    except ImportError:
        raise UserError("the lossless stage needs the 'zstandard' package; pip install zstandard") from None
    return zstandard


def byte_planes(tensor: torch.Tensor) -> list[bytes]:
    """(n elements) -> element_size planes of n bytes; plane j is byte j of every element."""
    raw = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8)
    grouped = raw.reshape(-1, tensor.element_size()).T.contiguous()
    return [bytes(plane.numpy().tobytes()) for plane in grouped]


def coded_planes(tensor: torch.Tensor, level: int = 10) -> list[tuple[str, bytes]]:
    """(codec, bytes) of each byte plane as `encode` stores it: zstd-coded unless that would not
    shrink it. zstandard releases the GIL while it codes, so threads may code tensors side by side."""
    compressor = _zstd().ZstdCompressor(level=level, threads=0, write_checksum=True)
    out = []
    for plane in byte_planes(tensor):
        coded = compressor.compress(plane)
        out.append(("zstd", coded) if len(coded) < len(plane) else ("raw", plane))
    return out


def coded_nbytes(tensor: torch.Tensor, level: int = 10) -> int:
    """Length of the blob `encode(tensor, level)` makes, without making it."""
    return sum(len(data) for _, data in coded_planes(tensor, level))


def encode(tensor: torch.Tensor, level: int = 10) -> tuple[torch.Tensor, dict[str, Any]]:
    """A tensor -> (uint8 blob, entry). Each plane is zstd-coded unless that would not shrink it."""
    chunks, planes = [], []
    for codec, data in coded_planes(tensor, level):
        chunks.append(data)
        planes.append([codec, len(data)])
    blob = torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8) if chunks else \
        torch.zeros(0, dtype=torch.uint8)
    entry = {"dtype": str(tensor.dtype).removeprefix("torch."), "shape": list(tensor.shape),
             "planes": planes}
    return blob, entry


def entry_problem(entry: dict[str, Any], dtype: torch.dtype, shape: tuple[int, ...], blob_dtype: str,
                  blob_shape: list[int]) -> str | None:
    """Why a coded tensor's entry (validated types) cannot decode to `dtype` `shape` from a safetensors
    blob of `blob_dtype` `blob_shape`, checked before anything is decompressed; or None."""
    want = str(dtype).removeprefix("torch.")
    if entry["dtype"] != want or tuple(entry["shape"]) != tuple(shape):
        return f"it decodes to {entry['dtype']} {tuple(entry['shape'])}, the model needs {want} {tuple(shape)}"
    if blob_dtype != "U8" or len(blob_shape) != 1:
        return f"its blob is {blob_dtype} {tuple(blob_shape)}, not a 1-D U8 tensor"
    planes, count = entry["planes"], 1
    for dim in shape:
        count *= dim
    if len(planes) != torch.empty(0, dtype=dtype).element_size():
        return f"{len(planes)} byte planes for a {want} tensor"
    if sum(length for _, length in planes) != blob_shape[0]:
        return "its planes do not add up to its blob"
    if any(codec == "raw" and length != count for codec, length in planes):
        return "a raw plane's length differs from the element count"
    return None


def decode(blob: torch.Tensor, entry: dict[str, Any], name: str = "tensor") -> torch.Tensor:
    """The exact tensor `encode` was given. A blob that does not decode is a one-line error."""
    try:
        dtype, shape, planes = _DTYPES[entry["dtype"]], list(entry["shape"]), entry["planes"]
        data = bytes(blob.numpy().tobytes())
        count = 1
        for dim in shape:
            count *= int(dim)
        decompressor, out, offset = _zstd().ZstdDecompressor(), [], 0
        for codec, length in planes:
            chunk = data[offset: offset + length]
            offset += length
            plane = decompressor.decompress(chunk, max_output_size=count) if codec == "zstd" else chunk
            if len(plane) != count:
                raise ValueError("plane length")
            out.append(torch.frombuffer(bytearray(plane), dtype=torch.uint8))
        if offset != len(data) or len(out) != torch.empty(0, dtype=dtype).element_size():
            raise ValueError("blob length")
    except UserError:
        raise
    except Exception:
        raise UserError(f"lossless-coded tensor {name} does not decode (corrupt artifact); "
                        "re-create the artifact") from None
    if count == 0:
        return torch.zeros(shape, dtype=dtype)
    return torch.stack(out, 1).reshape(-1).view(dtype).reshape(shape).clone()
