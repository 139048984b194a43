"""Open a single or split GGUF file: validated header, metadata, tensor table, zero-copy views.

File layout (little-endian, GGUF v2/v3; v1 used 32-bit counts and is refused):

    u32 magic "GGUF" | u32 version | u64 n_tensors | u64 n_kv
    n_kv x      { str key | u32 value_type | value }
                value: scalar | str (u64 len + utf-8 bytes) | array (u32 elem_type, u64 n, n elems)
    n_tensors x { str name | u32 n_dims | u64 ne[n_dims] | u32 ggml_type | u64 offset }
    padding to `general.alignment` (u32 key, default 32, a power of two)
    tensor data; each offset is relative to the data start and aligned

A split set ("X-00001-of-00009.gguf", written by llama.cpp's gguf-split) is a series of full
GGUF files. Part 0 carries all the metadata; every part carries `split.no` (0-based),
`split.count` and `split.tensors.count` (tensors in the whole set) and some of the tensors.

Why not gguf.GGUFReader: it spends ~13 s on DeepSeek-R1's 129K-token vocabulary and allocates
whatever a corrupt header claims. This parser validates every count and length against the
bytes that are actually there before allocating, reads only the header (never tensor data),
and maps tensor data lazily with one read-only mmap per part.
"""

from __future__ import annotations

import mmap
import os
import pathlib
import re
import struct
from dataclasses import dataclass

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

__all__ = [
    "GGUFError",
    "GGUFFile",
    "SUPPORTED_TYPES",
    "TensorInfo",
    "read_header",
    "split_part_paths",
]


class GGUFError(ValueError):
    """A GGUF file is malformed, truncated, incomplete or uses something we cannot compute."""


_T = GGMLQuantizationType
# GGML types the runtime can compute (dequantize on the GPU / native kernels on the CPU).
SUPPORTED_TYPES: frozenset[int] = frozenset(
    int(t) for t in (_T.F32, _T.F16, _T.Q4_0, _T.Q5_0, _T.Q8_0, _T.Q4_K, _T.Q5_K, _T.Q6_K, _T.BF16)
)

_MAGIC = b"GGUF"
_DEFAULT_ALIGNMENT = 32
_MAX_DIMS = 4  # GGML_MAX_DIMS
_MAX_NAME = 64  # GGML_MAX_NAME: llama.cpp refuses tensor names of 64 bytes or more
# Caps against corrupt headers. The largest real header we know (DeepSeek-R1's 129K-token
# vocabulary plus merges) is ~6 MB; a chat template is a few KB.
_MAX_STRING = 64 << 20
_MAX_HEADER = 512 << 20
_MAX_ELEMENTS = 1 << 60  # per tensor; keeps byte counts far from int64 overflow
_FIRST_READ = 256 << 10

_MIN_KV_BYTES = 8 + 4 + 1  # empty key, type, smallest value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8  # empty name, n_dims 0, type, offset

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_SCALAR = {
    GGUFValueType.UINT8: struct.Struct("<B"),
    GGUFValueType.INT8: struct.Struct("<b"),
    GGUFValueType.UINT16: struct.Struct("<H"),
    GGUFValueType.INT16: struct.Struct("<h"),
    GGUFValueType.UINT32: struct.Struct("<I"),
    GGUFValueType.INT32: struct.Struct("<i"),
    GGUFValueType.FLOAT32: struct.Struct("<f"),
    GGUFValueType.BOOL: struct.Struct("<B"),
    GGUFValueType.UINT64: struct.Struct("<Q"),
    GGUFValueType.INT64: struct.Struct("<q"),
    GGUFValueType.FLOAT64: struct.Struct("<d"),
}
_ARRAY_DTYPE = {
    GGUFValueType.UINT8: np.dtype("<u1"),
    GGUFValueType.INT8: np.dtype("<i1"),
    GGUFValueType.UINT16: np.dtype("<u2"),
    GGUFValueType.INT16: np.dtype("<i2"),
    GGUFValueType.UINT32: np.dtype("<u4"),
    GGUFValueType.INT32: np.dtype("<i4"),
    GGUFValueType.FLOAT32: np.dtype("<f4"),
    GGUFValueType.BOOL: np.dtype("<u1"),
    GGUFValueType.UINT64: np.dtype("<u8"),
    GGUFValueType.INT64: np.dtype("<i8"),
    GGUFValueType.FLOAT64: np.dtype("<f8"),
}
_VALUE_TYPES = {int(t): t for t in GGUFValueType}

_SPLIT_RE = re.compile(r"^(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
_KEY_SPLIT_NO = "split.no"
_KEY_SPLIT_COUNT = "split.count"
_KEY_SPLIT_TENSORS = "split.tensors.count"


def _type_name(ggml_type: int) -> str:
    try:
        return GGMLQuantizationType(ggml_type).name
    except ValueError:
        return f"type {ggml_type}"


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a GGUF file; `ne` in GGML order, `shape` in numpy order."""

    name: str
    ggml_type: int  # gguf.GGMLQuantizationType value
    ne: tuple[int, ...]  # ne[0] = row length (contiguous dim)
    shape: tuple[int, ...]  # reversed(ne), e.g. ffn_gate_exps -> (E, F, D)
    n_bytes: int
    path: pathlib.Path  # the part of a split set that holds the data
    offset: int  # absolute byte offset of the data in `path`

    @property
    def type_name(self) -> str:
        return _type_name(self.ggml_type)

    @property
    def row_bytes(self) -> int:
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType(self.ggml_type)]
        return self.ne[0] // block * size

    @property
    def n_rows(self) -> int:
        n = 1
        for d in self.ne[1:]:
            n *= d
        return n


class _Header:
    """What one file's header says: metadata, tensor table, where the data starts."""

    def __init__(self, path, metadata, tensors, alignment, data_start, file_size, kv_range):
        self.path = path
        self.kv_start, self.kv_end = kv_range  # byte range of the metadata section
        self.metadata = metadata
        self.tensors = tensors  # list[TensorInfo], file order
        self.alignment = alignment
        self.data_start = data_start
        self.file_size = file_size


class _Reader:
    """Bounds-checked cursor over a file prefix that is read on demand (doubling chunks), so a
    header costs about its own size in reads and a corrupt length never allocates more than
    the file holds."""

    def __init__(self, f, path: pathlib.Path, file_size: int):
        self.f = f
        self.path = path
        self.file_size = file_size
        self.limit = min(file_size, _MAX_HEADER)
        self.data = bytearray()
        self.pos = 0

    def fail(self, what: str) -> GGUFError:
        return GGUFError(f"{self.path}: {what}")

    def ensure(self, end: int, what: str) -> None:
        if end <= len(self.data):
            return
        if end > self.limit:
            if end > self.file_size:
                raise self.fail(
                    f"truncated: {what} needs bytes up to {end} but the file has "
                    f"{self.file_size}; the file is incomplete (re-download or re-copy it)"
                )
            raise self.fail(f"header larger than {_MAX_HEADER >> 20} MiB at {what}: corrupt file")
        want = min(self.limit, max(end, 2 * len(self.data), _FIRST_READ))
        self.f.seek(len(self.data))
        chunk = self.f.read(want - len(self.data))
        self.data += chunk
        if len(self.data) < end:
            raise self.fail(f"truncated while reading {what} (file changed while reading?)")

    def remaining(self) -> int:
        return self.limit - self.pos

    def u32(self, what: str) -> int:
        self.ensure(self.pos + 4, what)
        (v,) = _U32.unpack_from(self.data, self.pos)
        self.pos += 4
        return v

    def u64(self, what: str) -> int:
        self.ensure(self.pos + 8, what)
        (v,) = _U64.unpack_from(self.data, self.pos)
        self.pos += 8
        return v

    def raw_str(self, what: str) -> bytes:
        n = self.u64(what)
        if n > _MAX_STRING or n > self.remaining():
            raise self.fail(
                f"{what}: string length {n} is larger than the "
                f"{'file' if n <= _MAX_STRING else f'{_MAX_STRING >> 20} MiB cap'}: corrupt file"
            )
        self.ensure(self.pos + n, what)
        b = bytes(self.data[self.pos : self.pos + n])
        self.pos += n
        return b

    def str(self, what: str, strict: bool = True) -> str:
        b = self.raw_str(what)
        try:
            return b.decode("utf-8", "strict" if strict else "surrogateescape")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not valid UTF-8: corrupt file") from None

    def str_array(self, n: int, what: str) -> list[str]:
        # One tight loop over the buffer: 250K strings (R1 tokens + merges) take ~0.1 s.
        # Invalid UTF-8 in a token is kept byte-exact with surrogateescape instead of failing.
        out = [None] * n
        data = self.data
        pos = self.pos
        size = len(data)
        limit = self.limit
        unpack = _U64.unpack_from
        for i in range(n):
            if pos + 8 > size:
                self.ensure(pos + 8, what)
                size = len(data)
            (k,) = unpack(data, pos)
            pos += 8
            end = pos + k
            if end > size:
                if k > _MAX_STRING or end > limit:
                    raise self.fail(f"{what}[{i}]: string length {k} runs past the header: corrupt file")
                self.ensure(end, what)
                size = len(data)
            out[i] = data[pos:end].decode("utf-8", "surrogateescape")
            pos = end
        self.pos = pos
        return out

    def value(self, vtype: int, what: str):
        if vtype == GGUFValueType.STRING:
            return self.str(what, strict=False)
        if vtype == GGUFValueType.ARRAY:
            etype = self.u32(what)
            n = self.u64(what)
            if etype not in _VALUE_TYPES:
                raise self.fail(f"{what}: unknown array element type {etype}: corrupt file")
            if etype == GGUFValueType.ARRAY:
                raise self.fail(f"{what}: nested arrays are not supported by GGUF readers")
            min_size = 8 if etype == GGUFValueType.STRING else _ARRAY_DTYPE[etype].itemsize
            if n * min_size > self.remaining():
                raise self.fail(f"{what}: array of {n} elements is larger than the file: corrupt file")
            if etype == GGUFValueType.STRING:
                return self.str_array(n, what)
            dt = _ARRAY_DTYPE[etype]
            nbytes = n * dt.itemsize
            self.ensure(self.pos + nbytes, what)
            arr = np.frombuffer(self.data, dtype=dt, count=n, offset=self.pos).copy()
            self.pos += nbytes
            if etype == GGUFValueType.BOOL:
                arr = arr.astype(bool)
            return arr
        st = _SCALAR.get(vtype)
        if st is None:
            raise self.fail(f"{what}: unknown value type {vtype}: corrupt file")
        self.ensure(self.pos + st.size, what)
        (v,) = st.unpack_from(self.data, self.pos)
        self.pos += st.size
        if vtype == GGUFValueType.BOOL:
            v = bool(v)
        return v


def _parse_header(path: pathlib.Path) -> _Header:
    try:
        file_size = os.stat(path).st_size
        f = open(path, "rb", buffering=0)
    except OSError as e:
        raise GGUFError(f"{path}: cannot open: {e.strerror or e}") from None
    with f:
        r = _Reader(f, path, file_size)
        if file_size < 4:
            raise r.fail(f"not a GGUF file (only {file_size} bytes)")
        r.ensure(4, "magic")
        if bytes(r.data[:4]) != _MAGIC:
            raise r.fail(f"not a GGUF file (starts with {bytes(r.data[:4])!r}, expected b'GGUF')")
        r.pos = 4
        version = r.u32("version")
        if version == 1:
            raise r.fail("GGUF version 1 is not supported; convert the model again with a current llama.cpp")
        if version not in (2, 3):
            hint = " (a big-endian file?)" if version > 0xFFFF else ""
            raise r.fail(f"unsupported GGUF version {version}{hint}; expected 2 or 3")
        n_tensors = r.u64("tensor count")
        n_kv = r.u64("metadata count")
        if n_kv * _MIN_KV_BYTES > r.remaining():
            raise r.fail(f"header claims {n_kv} metadata entries, more than the file can hold: corrupt file")
        if n_tensors * _MIN_TENSOR_INFO_BYTES > r.remaining():
            raise r.fail(f"header claims {n_tensors} tensors, more than the file can hold: corrupt file")

        metadata: dict[str, object] = {}
        kv_start = r.pos
        for i in range(n_kv):
            key = r.str(f"metadata key #{i}")
            if not key:
                raise r.fail(f"metadata key #{i} is empty: corrupt file")
            if key in metadata:
                raise r.fail(f"duplicate metadata key {key!r}: corrupt file")
            vtype = r.u32(f"type of {key!r}")
            metadata[key] = r.value(vtype, f"metadata {key!r}")
        kv_end = r.pos

        alignment = _DEFAULT_ALIGNMENT
        if "general.alignment" in metadata:
            alignment = metadata["general.alignment"]
            if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0 or alignment & (alignment - 1):
                raise r.fail(f"general.alignment {alignment!r} is not a power of two: corrupt file")

        raw = []
        seen = set()
        for i in range(n_tensors):
            name = r.str(f"name of tensor #{i}")
            if len(name.encode()) >= _MAX_NAME:
                raise r.fail(f"tensor name {name[:80]!r} is {len(name.encode())} bytes; GGML allows < {_MAX_NAME}")
            if name in seen:
                raise r.fail(f"duplicate tensor {name!r}: corrupt file")
            seen.add(name)
            n_dims = r.u32(f"n_dims of tensor {name!r}")
            if n_dims > _MAX_DIMS:
                raise r.fail(f"tensor {name!r} has {n_dims} dimensions; GGML allows at most {_MAX_DIMS}")
            ne = tuple(r.u64(f"shape of tensor {name!r}") for _ in range(n_dims)) or (1,)
            n_el = 1
            for d in ne:
                if d == 0:
                    raise r.fail(f"tensor {name!r} has an empty dimension: ne={ne}")
                n_el *= d
                if n_el > _MAX_ELEMENTS:
                    raise r.fail(f"tensor {name!r} has an absurd shape ne={ne}: corrupt file")
            gtype = r.u32(f"type of tensor {name!r}")
            try:
                block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(gtype)]
            except (ValueError, KeyError):
                raise r.fail(f"tensor {name!r} has unknown GGML type {gtype}: corrupt file or newer format") from None
            if ne[0] % block:
                raise r.fail(
                    f"tensor {name!r} ({_type_name(gtype)}) has row length {ne[0]}, "
                    f"not a multiple of its block size {block}: corrupt file"
                )
            rel = r.u64(f"offset of tensor {name!r}")
            if rel % alignment:
                raise r.fail(f"tensor {name!r} data offset {rel} is not aligned to {alignment}: corrupt file")
            raw.append((name, gtype, ne, n_el // block * type_size, rel))

        data_start = -(-r.pos // alignment) * alignment
        # tensors lie back to back in the order of the header, each padded to the alignment
        # (as llama.cpp's gguf_init requires): a type or shape that disagrees with the data
        # layout (sizes derive from them) shows as an offset out of place
        expect = 0
        for i, (name, gtype, ne, n_bytes, rel) in enumerate(raw):
            if rel != expect:
                prev = (f"after tensor {raw[i - 1][0]!r} ({_type_name(raw[i - 1][1])}, ne={raw[i - 1][2]})"
                        if i else "for the first tensor")
                raise GGUFError(
                    f"{path}: tensor {name!r} has data offset {rel}, expected {expect} {prev}: a "
                    f"type or shape disagrees with the data (corrupt file)")
            expect = rel + -(-n_bytes // alignment) * alignment
        tensors = []
        for name, gtype, ne, n_bytes, rel in raw:
            start = data_start + rel
            if start + n_bytes > file_size:
                raise GGUFError(
                    f"{path}: truncated: tensor {name!r} needs bytes [{start}, {start + n_bytes}) "
                    f"but the file has {file_size} bytes ({start + n_bytes - file_size} missing); "
                    f"the file is incomplete (re-download or re-copy it)"
                )
            tensors.append(TensorInfo(name, gtype, ne, tuple(reversed(ne)), n_bytes, path, start))
        return _Header(path, metadata, tensors, alignment, data_start, file_size, (kv_start, kv_end))


def split_part_paths(path) -> list[pathlib.Path]:
    """All parts of the split set that `path` names ("X-00002-of-00009.gguf" -> 9 paths), or
    [path] when the name does not follow the split pattern."""
    path = pathlib.Path(path)
    m = _SPLIT_RE.match(path.name)
    if not m:
        return [path]
    count = int(m["count"])
    return [path.with_name(f"{m['prefix']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]


def _as_int(v):
    return v if isinstance(v, int) and not isinstance(v, bool) else None


class GGUFFile:
    """A GGUF model, single file or split set: metadata, tensor table and zero-copy views.

    Opening reads headers only. `view(name)` maps the data read-only on first use.
    Metadata values are Python scalars and str; string arrays are lists of str, numeric arrays
    1-D numpy arrays. Opening any part of a split set opens the whole set.
    """

    def __init__(self, path, *, check_types: bool = False):
        path = pathlib.Path(path)
        self.paths: list[pathlib.Path] = split_part_paths(path)
        self._maps: dict[pathlib.Path, mmap.mmap] = {}
        self._closed = False
        if len(self.paths) > 1:
            missing = [p for p in self.paths if not p.exists()]
            if missing:
                names = ", ".join(p.name for p in missing)
                raise GGUFError(
                    f"{path}: split set of {len(self.paths)} parts is incomplete: missing {names} "
                    f"in {path.parent}"
                )
        elif not path.exists():
            raise GGUFError(f"{path}: no such file")
        headers = [_parse_header(p) for p in self.paths]
        self._headers = headers
        self.metadata: dict[str, object] = headers[0].metadata
        self._check_split(path, headers)
        self.tensors: dict[str, TensorInfo] = {}
        for h in headers:
            for t in h.tensors:
                if t.name in self.tensors:
                    raise GGUFError(
                        f"{h.path}: tensor {t.name!r} is also in {self.tensors[t.name].path.name}: "
                        f"the parts come from different split sets"
                    )
                self.tensors[t.name] = t
        if len(headers) > 1:
            want = _as_int(self.metadata.get(_KEY_SPLIT_TENSORS))
            if want is not None and want != len(self.tensors):
                raise GGUFError(
                    f"{path}: split set holds {len(self.tensors)} tensors but {_KEY_SPLIT_TENSORS} "
                    f"says {want}: the parts come from different split sets"
                )
        if check_types:
            self.check_supported()

    @staticmethod
    def _check_split(path: pathlib.Path, headers: list[_Header]) -> None:
        n = len(headers)
        first = headers[0].metadata
        count0 = _as_int(first.get(_KEY_SPLIT_COUNT))
        if n == 1:
            if count0 is not None and count0 > 1:
                raise GGUFError(
                    f"{path}: this is part {_as_int(first.get(_KEY_SPLIT_NO))} of a {count0}-part split "
                    f"set but its name does not follow NAME-00001-of-{count0:05d}.gguf; "
                    f"rename the parts to the names gguf-split gave them"
                )
            return
        tensors0 = _as_int(first.get(_KEY_SPLIT_TENSORS))
        for i, h in enumerate(headers):
            md = h.metadata
            no, count, tcount = (_as_int(md.get(k)) for k in (_KEY_SPLIT_NO, _KEY_SPLIT_COUNT, _KEY_SPLIT_TENSORS))
            if count is None or no is None:
                raise GGUFError(
                    f"{h.path}: named as part {i + 1} of {n} but has no {_KEY_SPLIT_COUNT}/"
                    f"{_KEY_SPLIT_NO} metadata: not a gguf-split part"
                )
            if count != n or no != i or tcount != tensors0:
                raise GGUFError(
                    f"{h.path}: does not belong to the split set of {path.name}: "
                    f"{_KEY_SPLIT_NO}={no} (expected {i}), {_KEY_SPLIT_COUNT}={count} (expected {n}), "
                    f"{_KEY_SPLIT_TENSORS}={tcount} (expected {tensors0}); "
                    f"replace it with the matching part"
                )

    # -- metadata ---------------------------------------------------------------------------

    @property
    def architecture(self) -> str:
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str):
            raise GGUFError(f"{self.paths[0]}: no general.architecture in the metadata")
        return arch

    def get(self, key: str, default=None):
        return self.metadata.get(key, default)

    # -- tensors ----------------------------------------------------------------------------

    def _info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise GGUFError(f"{self.paths[0]}: no tensor named {name!r}") from None

    def view(self, name: str) -> np.ndarray:
        """Read-only uint8 view [n_rows, row_bytes] of a tensor's bytes, straight from the mmap."""
        if self._closed:
            raise GGUFError(f"{self.paths[0]}: file is closed")
        t = self._info(name)
        mm = self._maps.get(t.path)
        if mm is None:
            with open(t.path, "rb") as f:
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self._maps[t.path] = mm
        arr = np.frombuffer(mm, dtype=np.uint8, count=t.n_bytes, offset=t.offset)
        return arr.reshape(t.n_rows, t.row_bytes)

    def check_supported(self, names=None) -> None:
        """Raise GGUFError naming the tensors whose GGML type we cannot compute."""
        infos = self.tensors.values() if names is None else [self._info(n) for n in names]
        bad = [t for t in infos if t.ggml_type not in SUPPORTED_TYPES]
        if bad:
            shown = ", ".join(f"{t.name} ({t.type_name})" for t in bad[:5])
            more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
            supported = ", ".join(sorted(_type_name(x) for x in SUPPORTED_TYPES))
            raise GGUFError(
                f"{self.paths[0]}: unsupported tensor types: {shown}{more}. Supported: {supported}. "
                f"Use a file quantized to one of these (e.g. Q4_K_M or Q8_0)"
            )

    # -- lifetime ---------------------------------------------------------------------------

    def close(self) -> None:
        """Release the mmaps. Views still alive keep their mapping until they are dropped."""
        self._closed = True
        maps, self._maps = self._maps, {}
        for mm in maps.values():
            try:
                mm.close()
            except BufferError:
                pass  # exported numpy views pin it; the mapping goes when they do

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        name = self.paths[0].name + (f" (+{len(self.paths) - 1} parts)" if len(self.paths) > 1 else "")
        arch = self.metadata.get("general.architecture", "?")
        return f"GGUFFile({name}, {arch}, {len(self.tensors)} tensors)"


def read_header(path) -> GGUFFile:
    """Open a GGUF (or split set) reading only its headers; no tensor data is touched."""
    return GGUFFile(path)
