"""Filters shared by record, report and (later) live: which sockets a user wants to see.

Values are validated as the numbers and addresses they must be when the CLI parses them.  Filters are
applied in the frontend, per socket: the kernel side stays unfiltered because a socket's first events
lack part of its 4-tuple (CLOSE -> SYN_SENT has local port 0), and filtering them out in the kernel would
cut lifecycles short.
"""

from __future__ import annotations

import ipaddress
from dataclasses import asdict, dataclass
from typing import Any, Optional


def parse_port(text: str) -> int:
    port = int(text)
    if not 0 < port < 65536:
        raise ValueError(f"port {port} is not in 1..65535")
    return port


def parse_addr(text: str) -> str:
    """Normalised address text (IPv4-mapped IPv6 shown as IPv4, as everywhere in the tool)."""
    addr = ipaddress.ip_address(text)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return str(addr)


_NONE7 = (None,) * 7


@dataclass(frozen=True)
class Filter:
    pid: Optional[int] = None
    comm: Optional[str] = None
    port: Optional[int] = None
    lport: Optional[int] = None
    rport: Optional[int] = None
    addr: Optional[str] = None
    family: Optional[int] = None

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @property
    def empty(self) -> bool:
        """No criterion set.  Checked per event on the intake path, so kept to a tuple test."""
        return (self.pid, self.comm, self.port, self.lport, self.rport, self.addr, self.family) == _NONE7

    def match(self, obj: Any, partial: bool = False) -> bool:
        """Does a lifecycle or record (attributes or keys pid, comm, family, laddr, lport, raddr, rport) match?

        partial=True is for sockets still being learned: a field not known yet (port 0, empty address,
        no owner) does not exclude them, so their first events are not dropped before the tuple is complete.
        A listener's remote end never becomes known, so listeners are always matched in full.
        """
        get = obj.get if isinstance(obj, dict) else (lambda key: getattr(obj, key, None))
        if get("role") == "listener":
            partial = False

        def ok(value: Any, wanted: Any) -> bool:
            if value in (None, 0, ""):
                return partial
            return value == wanted

        if self.pid is not None and not ok(get("pid"), self.pid):
            return False
        if self.comm is not None and not ok(get("comm"), self.comm):
            return False
        if self.family is not None and not ok(get("family"), self.family):
            return False
        if self.lport is not None and not ok(get("lport"), self.lport):
            return False
        if self.rport is not None and not ok(get("rport"), self.rport):
            return False
        if self.port is not None:
            lport, rport = get("lport"), get("rport")
            if self.port not in (lport, rport) and not (partial and not (lport and rport)):
                return False
        if self.addr is not None:
            laddr, raddr = get("laddr"), get("raddr")
            if self.addr not in (laddr, raddr) and not (partial and not (laddr and raddr)):
                return False
        return True


NO_FILTER = Filter()
