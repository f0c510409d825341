"""The BTF reader on a hand-built blob: offsets through named and anonymous members, enums."""

from __future__ import annotations

import struct

import pytest

from tcptrace_bpf.btf import BTF, BTFError


def build_blob():
    strings = b"\0"
    names = {}

    def name(text):
        nonlocal strings
        if text not in names:
            names[text] = len(strings)
            strings += text.encode() + b"\0"
        return names[text]

    types = b""

    def add(name_off, kind, vlen, size_or_type, trailer=b"", kflag=0):
        nonlocal types
        types += struct.pack("<III", name_off, (kflag << 31) | (kind << 24) | vlen, size_or_type) + trailer

    add(name("int"), 1, 0, 4, struct.pack("<I", 32))                      # 1: int
    add(name("sock_common"), 4, 1, 8, struct.pack("<III", name("skc_state"), 1, 32))  # 2
    add(0, 5, 2, 4, struct.pack("<III", name("sk_err"), 1, 0) + struct.pack("<III", name("alias"), 1, 0))  # 3
    add(name("sock"), 4, 2, 16, struct.pack("<III", name("__sk_common"), 2, 0) + struct.pack("<III", 0, 3, 96))
    add(name("sk_rst_reason"), 6, 2, 4, struct.pack("<Ii", name("SK_RST_REASON_NO_SOCKET"), 1)
        + struct.pack("<Ii", name("SK_RST_REASON_X"), 2))
    add(0, 6, 2, 4, struct.pack("<Ii", name("LINUX_MIB_NUM"), 0) + struct.pack("<Ii", name("LINUX_MIB_KA"), 114))
    add(name("tw_timer_handler"), 12, 0, 1)  # FUNC (its FUNC_PROTO is not needed here)
    add(name("tcp_write_wakeup_x"), 13, 0, 0)  # a FUNC_PROTO with a name is not a function
    hdr = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(types), len(types), len(strings))
    return hdr + types + strings


def test_offsets_through_named_and_anonymous_members():
    btf = BTF(build_blob())
    assert btf.offset("sock", "sk_err") == 12  # anonymous union at bit 96
    assert btf.offset("sock", "__sk_common.skc_state") == 4
    assert btf.enum("sk_rst_reason") == {"SK_RST_REASON_NO_SOCKET": 1, "SK_RST_REASON_X": 2}
    assert btf.enum("nope") == {}


def test_enumerators_of_anonymous_enums_and_functions():
    btf = BTF(build_blob())
    assert btf.enumerator("LINUX_MIB_KA") == 114 and btf.enumerator("SK_RST_REASON_X") == 2
    with pytest.raises(BTFError, match="LINUX_MIB_NOPE"):
        btf.enumerator("LINUX_MIB_NOPE")
    assert btf.has_function("tw_timer_handler")
    assert not btf.has_function("tw_timer") and not btf.has_function("tcp_write_wakeup_x")
    assert not btf.has_function("sock")  # a struct's name is not a function's


def test_errors():
    with pytest.raises(BTFError):
        BTF(b"\0" * 30)
    btf = BTF(build_blob())
    with pytest.raises(BTFError, match="no member"):
        btf.offset("sock", "sk_nothing")
    with pytest.raises(BTFError, match="not in BTF"):
        btf.offset("task_struct", "pid")
