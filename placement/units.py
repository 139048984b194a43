"""Byte sizes and bandwidths as people write them ("48GiB", "512 GB", "150GB/s") and back."""

import re

_UNITS = {
    "": 1, "b": 1,
    "k": 1 << 10, "kib": 1 << 10, "kb": 10**3,
    "m": 1 << 20, "mib": 1 << 20, "mb": 10**6,
    "g": 1 << 30, "gib": 1 << 30, "gb": 10**9,
    "t": 1 << 40, "tib": 1 << 40, "tb": 10**12,
}
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")

GiB = 1 << 30
MiB = 1 << 20


class SizeError(ValueError):
    pass


def parse_size(text) -> int:
    """'48GiB' -> bytes. A bare 'G'/'M'/'T' is binary (GiB...), 'GB' is decimal.

    Numbers (int/float) pass through as bytes, and so does a bare number as text; on the
    command line a size needs a unit (size_with_unit).
    """
    if isinstance(text, bool):
        raise SizeError(f"not a size: {text!r}")
    if isinstance(text, (int, float)):
        return int(text)
    m = _SIZE_RE.match(str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise SizeError(f"not a size: {text!r} (write e.g. 48GiB, 512GB, 800M)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def size_with_unit(text) -> int:
    """parse_size for what a person types: a bare number other than 0 is refused with a hint
    (`--gpu-mem 48` meant 48 bytes)."""
    m = _SIZE_RE.match(str(text))
    if m and not m.group(2) and float(m.group(1)) != 0:
        raise SizeError(f"{text!r} has no unit: write {m.group(1)}GiB (or {m.group(1)}GB, {m.group(1)}MiB)")
    return parse_size(text)


def parse_bandwidth(text) -> float:
    """'150GB/s' -> bytes per second (the '/s' is optional)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return float(text)
    s = str(text).strip()
    if s.lower().endswith("/s"):
        s = s[:-2]
    return float(parse_size(s))


def fmt_bytes(n, unit=None) -> str:
    """Bytes as GiB/MiB/KiB with two decimals (always binary units, as llama.cpp prints)."""
    n = float(n)
    for name, size in (("TiB", 1 << 40), ("GiB", GiB), ("MiB", MiB), ("KiB", 1 << 10)):
        if unit == name or (unit is None and abs(n) >= size):
            return f"{n / size:.2f} {name}"
    return f"{int(n)} B"


def fmt_gb(n) -> str:
    """Decimal gigabytes, for the marketing-style numbers of RAM sticks and downloads."""
    return f"{n / 1e9:.1f} GB"


def parse_int_list(text) -> list:
    """Kernel cpu/node list syntax: '0-3,8,10-11' -> [0, 1, 2, 3, 8, 10, 11]. Empty -> []."""
    out = []
    text = str(text).strip()
    if not text:
        return out
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            lo, _, hi = part.partition("-")
            # cpulist strides ("0-15:2") appear in cgroup files; honour them too
            hi, _, stride = hi.partition(":")
            lo, hi, step = int(lo), int(hi), int(stride or 1)
            if hi < lo or step < 1:
                raise ValueError(f"bad range {part!r} in list {text!r}")
            out.extend(range(lo, hi + 1, step))
        else:
            out.append(int(part))
    return sorted(set(out))


def fmt_int_list(values) -> str:
    """[0, 1, 2, 3, 8] -> '0-3,8'."""
    values = sorted(set(int(v) for v in values))
    parts = []
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[j] + 1:
            j += 1
        parts.append(str(values[i]) if i == j else f"{values[i]}-{values[j]}")
        i = j + 1
    return ",".join(parts)
