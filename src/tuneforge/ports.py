"""Listening ports of the servers (web UI, API)."""

from __future__ import annotations

import socket


def port_is_free(host: str, port: int) -> bool:
    """Whether host:port can be listened on now (a taken port is refused before anything is loaded)."""
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True
