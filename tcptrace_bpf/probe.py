"""Gathering KernelFacts from the running system (tracefs, BTF, /sys, headers, bcc).

Kept apart from plan.py so the plan is pure and testable; this module only reads files.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import platform
import re
import time
from pathlib import Path
from typing import Optional

from tcptrace_bpf.btf import BTF, BTFError
from tcptrace_bpf.plan import (
    KEEPALIVE_TIMER,
    MIB_KEEPALIVE,
    PHASE_FUNCTIONS,
    RESET_FUNCTIONS,
    SOCK_FIELDS,
    TIMER_FIELDS,
    TIMER_FUNCTIONS,
    TRACEPOINTS,
    KernelFacts,
)

TRAMPOLINE_SYMBOL = "bpf_trampoline_link_prog"  # present where the kernel can run fentry programs

TRACEFS_CANDIDATES = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")
_FIELD = re.compile(r"field:(.+?)\s+(\w+)(\[\d+\])?;\s+offset:")


def tracefs_path() -> Optional[str]:
    for path in TRACEFS_CANDIDATES:
        if os.path.exists(os.path.join(path, "events")):
            return path
    return None


def tracepoint_fields(tracefs: str, name: str) -> Optional[dict[str, str]]:
    """Field name -> C type of a tracepoint, from its tracefs format; None if it does not exist."""
    try:
        text = Path(tracefs, "events", name, "format").read_text()
    except OSError:
        return None
    fields = {}
    for ctype, fname, _array in _FIELD.findall(text):
        if not fname.startswith("common_"):
            fields[fname] = ctype.strip()
    return fields


def kernel_version(release: str) -> tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", release)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def headers_release(release: str) -> Optional[str]:
    build = Path("/lib/modules", release, "build")
    if not build.exists():
        return None
    for candidate in ("include/config/kernel.release", "include/generated/utsrelease.h"):
        try:
            text = (build / candidate).read_text()
        except OSError:
            continue
        match = re.search(r'"?([0-9][^"\s]*)"?', text)
        if match:
            return match.group(1)
    return "unknown"


def kallsyms(names: set[str]) -> dict[str, int]:
    """Addresses of kernel symbols (0 for all when kptr_restrict hides them from us)."""
    found: dict[str, int] = {}
    try:
        with open("/proc/kallsyms") as syms:
            for line in syms:
                parts = line.split()
                if len(parts) >= 3 and parts[2] in names and parts[2] not in found:
                    found[parts[2]] = int(parts[0], 16)
                    if len(found) == len(names):
                        break
    except OSError:
        pass
    return found


_HZ_VALUES = (100, 250, 300, 1000)


def kernel_hz() -> Optional[int]:
    """The kernel's HZ (jiffies per second): CONFIG_HZ from /proc/config.gz, else measured from
    /proc/timer_list (jiffies against CLOCK_MONOTONIC over 0.2 s, snapped to a value Linux allows)."""
    try:
        with gzip.open("/proc/config.gz", "rt") as config:
            for line in config:
                if line.startswith("CONFIG_HZ="):
                    return int(line.split("=")[1])
    except (OSError, ValueError):
        pass

    def sample() -> tuple[int, int]:
        text = Path("/proc/timer_list").read_text()
        now = int(re.search(r"now at (\d+) nsecs", text).group(1))  # type: ignore[union-attr]
        jiffies = int(re.search(r"jiffies: (\d+)", text).group(1))  # type: ignore[union-attr]
        return now, jiffies

    try:
        (t0, j0), _ = sample(), time.sleep(0.2)
        t1, j1 = sample()
    except (OSError, AttributeError, ValueError):
        return None
    rate = (j1 - j0) / ((t1 - t0) / 1e9)
    return min(_HZ_VALUES, key=lambda hz: abs(hz - rate))


def bcc_problem() -> Optional[str]:
    """Why bcc's Python bindings are not usable, or None.  Found without importing them: importing bcc maps
    LLVM into the process (~60 MB that stay), and only the loader process needs it (kernel.spawn_loader),
    which reports an install that is found but broken."""
    try:
        spec = importlib.util.find_spec("bcc")
    except (ImportError, ValueError) as exc:
        return f"cannot import bcc ({exc})"
    if spec is None or not spec.origin:
        return "cannot import bcc (No module named 'bcc')"
    try:
        text = Path(spec.origin).read_text(errors="replace")
    except OSError as exc:
        return f"cannot read bcc ({exc})"
    if "class BPF" not in text:
        return f"the bcc found at {spec.origin} is not the BPF Compiler Collection (PyPI's unrelated 'bcc'?)"
    return None


def probe_kernel(check_bcc: bool = True) -> KernelFacts:
    release = platform.release()
    facts = KernelFacts(release=release, version=kernel_version(release), root=os.geteuid() == 0)
    if check_bcc:
        facts.bcc_error = bcc_problem()
    facts.tracefs = tracefs_path()
    if facts.tracefs:
        for name in TRACEPOINTS:
            fields = tracepoint_fields(facts.tracefs, name)
            if fields is not None:
                facts.tracepoints[name] = tuple(fields)
                facts.field_types[name] = fields
    try:
        btf = BTF.from_file()
        facts.sk_err_offset = btf.offset("sock", "sk_err")
        prefix = "SK_RST_REASON_"
        facts.rst_reasons = {v: k[len(prefix):] if k.startswith(prefix) else k
                             for k, v in btf.enum("sk_rst_reason").items()}
        for define, (struct_name, path) in {**SOCK_FIELDS, **TIMER_FIELDS}.items():
            try:
                if define == "TT_OFF_KA_TIMER":
                    try:
                        facts.offsets[define] = btf.offset(*KEEPALIVE_TIMER)
                        continue
                    except BTFError:
                        pass
                facts.offsets[define] = btf.offset(struct_name, path)
            except BTFError as exc:  # e.g. sk_protocol was a bitfield before 5.6: that hook falls back
                facts.timer_error = facts.timer_error or f"BTF: {exc}"
        facts.btf_functions = {name for name in (*PHASE_FUNCTIONS, *RESET_FUNCTIONS.values())
                               if btf.has_function(name)}
        try:
            facts.mib_keepalive = btf.enumerator(MIB_KEEPALIVE)
        except BTFError:
            pass
    except BTFError as exc:
        facts.btf = facts.sk_err_offset is not None
        facts.btf_error = str(exc)
        facts.timer_error = f"BTF: {exc}"
    addresses = kallsyms({*TIMER_FUNCTIONS.values(), *PHASE_FUNCTIONS, *RESET_FUNCTIONS.values(), TRAMPOLINE_SYMBOL})
    facts.functions = {name for name in (*PHASE_FUNCTIONS, *RESET_FUNCTIONS.values()) if name in addresses}
    facts.trampolines = facts.btf and TRAMPOLINE_SYMBOL in addresses and platform.machine() == "x86_64"
    if facts.timer_error is None:
        facts.timer_functions = {define: addresses[name] for define, name in TIMER_FUNCTIONS.items()
                                 if addresses.get(name)}
        if len(facts.timer_functions) < len(TIMER_FUNCTIONS):
            facts.timer_error = "timer handler addresses not readable in /proc/kallsyms"
        else:
            facts.hz = kernel_hz()
            if not facts.hz:
                facts.timer_error = "cannot tell the kernel's HZ"
    facts.kprobes = os.path.exists("/sys/bus/event_source/devices/kprobe/type") or (
        facts.tracefs is not None and os.path.exists(os.path.join(facts.tracefs, "kprobe_events"))
    )
    facts.headers = headers_release(release)
    return facts
