"""tcptrace-bpf: a live TCP connection tracer that rebuilds each socket's lifecycle through the TCP states."""

__version__ = "0.1.0"
