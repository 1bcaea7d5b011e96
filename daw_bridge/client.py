"""A small blocking OSC client over UDP: what `stemquery status`, the tests and examples/osc_client.py use."""
from __future__ import annotations

import socket
import time

from pythonosc.osc_message import OscMessage
from pythonosc.osc_message_builder import OscMessageBuilder


class OscClient:
    """Sends from, and receives replies on, one local UDP port (so no reply_port is needed)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 9130) -> None:
        self.server = (host, port)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))

    @property
    def port(self) -> int:
        return self.sock.getsockname()[1]

    def __enter__(self) -> "OscClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, address: str, *args) -> None:
        builder = OscMessageBuilder(address=address)
        for arg in args:
            builder.add_arg(arg)
        self.sock.sendto(builder.build().dgram, self.server)

    def send_raw(self, data: bytes) -> None:
        self.sock.sendto(data, self.server)

    def receive(self, timeout: float) -> tuple[str, list] | None:
        self.sock.settimeout(max(timeout, 1e-3))
        try:
            data, _ = self.sock.recvfrom(65536)
        except (socket.timeout, TimeoutError):
            return None
        message = OscMessage(data)
        return message.address, list(message.params)

    def wait_for(self, address: str, timeout: float) -> list | None:
        """Args of the next message to `address` (others are dropped), or None after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            message = self.receive(left)
            if message and message[0] == address:
                return message[1]
        return None

    def collect_until(self, addresses: set[str], timeout: float) -> list[tuple[str, list]]:
        """Every message received until one to an address in `addresses` arrives (included) or time runs out."""
        seen = []
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            message = self.receive(left)
            if message is None:
                break
            seen.append(message)
            if message[0] in addresses:
                break
        return seen
