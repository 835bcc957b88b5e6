"""Parsing of the HOST:PORT addresses that fairu's servers listen on."""

from __future__ import annotations

from fairu.protocol.errors import ConfigError

MAX_PORT = 65535


def parse_host_port(text: str, setting: str, example: str) -> tuple[str, int]:
    """Split "HOST:PORT", with an IPv6 host in brackets ("[::1]:9100").

    Raises ConfigError naming `setting` and showing `example` when the text has no
    host, no port, or a port outside 0 .. 65535.
    """
    host, separator, port_text = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not separator or not host or not port_text.isdigit():
        raise ConfigError(f"invalid {setting} {text!r}: use HOST:PORT, such as {example}")
    port = int(port_text)
    if port > MAX_PORT:
        raise ConfigError(f"invalid port {port} in {setting} {text!r}: use 0 to {MAX_PORT}")
    return host, port
