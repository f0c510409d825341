"""Struct field offsets from the running kernel's BTF (/sys/kernel/btf/vmlinux).

Why our own reader: the only kernel headers a host may have can belong to another kernel version, and
their struct layouts are then silently wrong.  BTF is the kernel describing itself, so every struct field a
BPF program reads takes its offset from here.  The reader is small on purpose: it walks the type section
once, keeps what is needed to resolve member offsets and enum values, and nothing else.
"""

from __future__ import annotations

import struct
from pathlib import Path

VMLINUX = Path("/sys/kernel/btf/vmlinux")

_MAGIC = 0xEB9F
_KIND_INT, _KIND_PTR, _KIND_ARRAY, _KIND_STRUCT, _KIND_UNION, _KIND_ENUM = 1, 2, 3, 4, 5, 6
_KIND_TYPEDEF, _KIND_VOLATILE, _KIND_CONST, _KIND_RESTRICT, _KIND_FUNC = 8, 9, 10, 11, 12
_KIND_FUNC_PROTO, _KIND_VAR, _KIND_DATASEC, _KIND_DECL_TAG, _KIND_TYPE_TAG, _KIND_ENUM64 = 13, 14, 15, 17, 18, 19
# Bytes that follow the 12-byte common header, per kind: fixed part and per-vlen part.
_TRAILER = {
    _KIND_INT: (4, 0), _KIND_ARRAY: (12, 0), _KIND_STRUCT: (0, 12), _KIND_UNION: (0, 12),
    _KIND_ENUM: (0, 8), _KIND_FUNC_PROTO: (0, 8), _KIND_VAR: (4, 0), _KIND_DATASEC: (0, 12),
    _KIND_DECL_TAG: (4, 0), _KIND_ENUM64: (0, 12),
}
_QUALIFIERS = (_KIND_TYPEDEF, _KIND_VOLATILE, _KIND_CONST, _KIND_RESTRICT, _KIND_TYPE_TAG)


class BTFError(Exception):
    """The BTF blob is missing, malformed, or lacks a type or member we need."""


class BTF:
    """Parsed type index of one BTF blob."""

    def __init__(self, blob: bytes) -> None:
        if len(blob) < 24:
            raise BTFError("BTF blob too short")
        magic, _ver, _flags, hdr_len = struct.unpack_from("<HBBI", blob, 0)
        if magic != _MAGIC:
            raise BTFError("not a BTF blob (bad magic)")
        type_off, type_len, str_off, str_len = struct.unpack_from("<IIII", blob, 8)
        self._blob = blob
        self._types_start = hdr_len + type_off
        self._strings = blob[hdr_len + str_off : hdr_len + str_off + str_len]
        # type id -> (kind, name_off, vlen, size_or_type, offset of trailer); id 0 is void.
        self._types: list[tuple[int, int, int, int, int]] = [(0, 0, 0, 0, 0)]
        self._by_name: dict[tuple[int, str], int] = {}
        unpack = struct.Struct("<III").unpack_from
        pos, end = self._types_start, self._types_start + type_len
        named = (_KIND_STRUCT, _KIND_UNION, _KIND_ENUM, _KIND_ENUM64)
        self._functions: set[int] = set()  # name offsets of FUNC types (decoded only when asked)
        self._enums: list[int] = []  # every enum, named or not (the MIB counters are an anonymous enum)
        while pos < end:
            name_off, info, size_or_type = unpack(blob, pos)
            kind, vlen = (info >> 24) & 0x1F, info & 0xFFFF
            fixed, per = _TRAILER.get(kind, (0, 0))
            self._types.append((kind, name_off, vlen, size_or_type, pos + 12))
            if kind == _KIND_ENUM:
                self._enums.append(len(self._types) - 1)
            elif kind == _KIND_FUNC:
                self._functions.add(name_off)
            if kind in named and name_off:
                self._by_name.setdefault((kind, self._name(name_off)), len(self._types) - 1)
            pos += 12 + fixed + per * vlen

    @classmethod
    def from_file(cls, path: Path = VMLINUX) -> BTF:
        try:
            return cls(path.read_bytes())
        except OSError as exc:
            raise BTFError(f"cannot read {path}: {exc.strerror}") from exc

    def _name(self, off: int) -> str:
        end = self._strings.index(b"\0", off)
        return self._strings[off:end].decode()

    def _resolve(self, type_id: int) -> int:
        while self._types[type_id][0] in _QUALIFIERS:
            type_id = self._types[type_id][3]
        return type_id

    def _members(self, type_id: int):
        kind, _name, vlen, _size, trailer = self._types[type_id]
        kflag = bool(struct.unpack_from("<I", self._blob, trailer - 8)[0] >> 31)
        for i in range(vlen):
            name_off, mtype, moff = struct.unpack_from("<III", self._blob, trailer + 12 * i)
            bits = moff & 0xFFFFFF if kflag else moff
            yield (self._name(name_off) if name_off else ""), mtype, bits

    def _find(self, type_id: int, member: str) -> tuple[int, int] | None:
        """(bit offset, member type) of `member` in a struct/union, looking through anonymous members."""
        for name, mtype, bits in self._members(type_id):
            if name == member:
                return bits, mtype
            if not name:
                inner = self._resolve(mtype)
                if self._types[inner][0] in (_KIND_STRUCT, _KIND_UNION):
                    found = self._find(inner, member)
                    if found:
                        return bits + found[0], found[1]
        return None

    def offset(self, struct_name: str, path: str) -> int:
        """Byte offset of `path` ("a" or "a.b.c") inside `struct struct_name`."""
        type_id = self._by_name.get((_KIND_STRUCT, struct_name))
        if type_id is None:
            raise BTFError(f"struct {struct_name} not in BTF")
        total = 0
        for part in path.split("."):
            found = self._find(self._resolve(type_id), part)
            if found is None:
                raise BTFError(f"struct {struct_name} has no member {path}")
            total += found[0]
            type_id = found[1]
        if total % 8:
            raise BTFError(f"{struct_name}.{path} is a bitfield")
        return total // 8

    def enum(self, enum_name: str) -> dict[str, int]:
        """Name -> value of every enumerator of `enum enum_name` (empty if the kernel has no such enum)."""
        type_id = self._by_name.get((_KIND_ENUM, enum_name))
        return {} if type_id is None else self._enumerators(type_id)

    def enumerator(self, name: str) -> int:
        """The value of one enumerator, in whichever enum holds it (named or anonymous)."""
        for type_id in self._enums:
            values = self._enumerators(type_id)
            if name in values:
                return values[name]
        raise BTFError(f"enumerator {name} not in BTF")

    def has_function(self, name: str) -> bool:
        """Whether the kernel describes this function in BTF (fentry can attach only to those)."""
        needle, start = b"\0" + name.encode() + b"\0", 0
        while (at := self._strings.find(needle, start)) >= 0:
            if at + 1 in self._functions:
                return True
            start = at + 1
        return False

    def _enumerators(self, type_id: int) -> dict[str, int]:
        _kind, _name, vlen, _size, trailer = self._types[type_id]
        values = {}
        for i in range(vlen):
            name_off, val = struct.unpack_from("<Ii", self._blob, trailer + 8 * i)
            values[self._name(name_off)] = val
        return values
