"""Host networking helpers: free ports, the loopback address, random shared-memory names, init URLs."""

from __future__ import annotations

import functools
import secrets
import socket

__all__ = ["get_free_port", "get_loopback_ip", "unique_name", "tcp_init_method"]


@functools.lru_cache(maxsize=1)
def get_loopback_ip() -> str:
    """The loopback address this host can bind: "127.0.0.1", else "::1" on IPv6-only hosts."""
    for family, addr in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.bind((addr, 0))
            return addr
        except OSError:
            continue
    raise RuntimeError("no loopback interface can be bound (neither 127.0.0.1 nor ::1)")


def get_free_port(host: str | None = None) -> int:
    """A TCP port that is free right now on `host` (default: loopback), chosen by the kernel.

    The port is released before returning, so another process may take it before the caller
    binds it; callers that bind it themselves should retry on EADDRINUSE.
    """
    host = host or get_loopback_ip()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def unique_name(prefix: str = "ss") -> str:
    """A random name for a shared-memory segment or socket file: `{prefix}_{16 hex chars}`.

    Keep `prefix` short: macOS limits POSIX shared-memory names to 31 characters.
    """
    return f"{prefix}_{secrets.token_hex(8)}"


def tcp_init_method(host: str, port: int) -> str:
    """A torch.distributed init URL, e.g. "tcp://127.0.0.1:29500" or "tcp://[::1]:29500"."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"tcp://{host}:{int(port)}"
