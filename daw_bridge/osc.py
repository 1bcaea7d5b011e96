"""The OSC front end: UDP, and TCP on the same port number (OSC 1.1 SLIP frames or OSC 1.0 length-prefixed
packets, told apart by the first byte). See docs/osc.md.

Every packet gets an answer: a reply, or `/stemquery/error req code message`, sent where the request's
`reply_port` says. Nothing a client sends can raise out of a handler: parsing, type checks and path checks all end
in an error reply, and every refusal is logged.
"""
from __future__ import annotations

import logging
import socket
import socketserver
import struct
import threading
import uuid
from dataclasses import dataclass
from typing import Callable

from pythonosc import osc_message_builder, slip
from pythonosc.osc_bundle import OscBundle
from pythonosc.osc_message import OscMessage
from pythonosc.osc_packet import OscPacket

from stemquery.daw_bridge.journal import Job
from stemquery.daw_bridge.spec import validate_spec
from stemquery.model.errors import StemqueryError

log = logging.getLogger(__name__)

PREFIX = "/stemquery"
MAX_TCP_FRAME = 1 << 20
OPTION_KEYS = {"reply_port", "engine", "refine", "steps", "query_start", "query_end", "format", "bit_depth",
               "stem"}


class ReplyChannel:
    """Where the answers to one client go."""

    def send(self, address: str, *args) -> None:
        raise NotImplementedError

    def persistent(self) -> dict | None:
        """A form that survives a restart (UDP host/port), or None (a TCP connection does not)."""
        return None


@dataclass
class UdpReply(ReplyChannel):
    sock: socket.socket
    host: str
    port: int

    def send(self, address: str, *args) -> None:
        self.sock.sendto(build(address, args), (self.host, self.port))

    def persistent(self) -> dict:
        return {"host": self.host, "port": self.port}

    def __str__(self) -> str:
        return f"udp {self.host}:{self.port}"


def slip_frame(packet: bytes) -> bytes:
    return slip.encode(packet)


def length_frame(packet: bytes) -> bytes:
    return struct.pack(">I", len(packet)) + packet


class TcpReply(ReplyChannel):
    """Replies on the request's connection, in the framing the client used (SLIP or length-prefixed)."""

    def __init__(self, conn: socket.socket, frame: Callable[[bytes], bytes] = slip_frame) -> None:
        self.conn = conn
        self.frame = frame
        self.lock = threading.Lock()
        self.open = True

    def send(self, address: str, *args) -> None:
        if not self.open:
            return
        try:
            with self.lock:
                self.conn.sendall(self.frame(build(address, args)))
        except OSError:
            self.open = False

    def __str__(self) -> str:
        try:
            host, port = self.conn.getpeername()[:2]
            return f"tcp {host}:{port}"
        except OSError:
            return "tcp (closed)"


def build(address: str, args) -> bytes:
    builder = osc_message_builder.OscMessageBuilder(address=address)
    for arg in args:
        builder.add_arg(arg)
    return builder.build().dgram


class OscRequestError(StemqueryError):
    code = "bad_request"


def redirect(args: list, reply: ReplyChannel) -> tuple[list, ReplyChannel]:
    """Take a `reply_port P` pair (the last one) out of any request's arguments; over UDP, answer on port P of
    the sender's host from now on. A bad port is refused (to the sender: there is nowhere else to answer)."""
    spots = [i for i in range(len(args) - 1) if args[i] == "reply_port"]
    if not spots:
        return args, reply
    index = spots[-1]
    port = _int(args[index + 1], "reply_port")
    if not 1 <= port <= 65535:
        raise OscRequestError(f"reply_port {port} is not a port number (1-65535)")
    rest = args[:index] + args[index + 2:]
    if isinstance(reply, UdpReply):
        return rest, UdpReply(reply.sock, reply.host, port)
    return rest, reply  # TCP: replies come back on the connection


def _string(args: list, index: int, name: str, *, optional: bool = False) -> str:
    if index >= len(args):
        if optional:
            return ""
        raise OscRequestError(f"missing argument {index + 1} ({name}:s)")
    value = args[index]
    if not isinstance(value, str):
        raise OscRequestError(f"argument {index + 1} ({name}) must be a string, got {type(value).__name__}")
    return value


def _int(value, name: str) -> int:
    """Ints, integral floats (TouchOSC sends floats) and numeric strings."""
    if isinstance(value, bool):
        return int(value)
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise OscRequestError(f"{name} must be a number, got {value!r}") from None
    if number != int(number):
        raise OscRequestError(f"{name} must be a whole number, got {number}")
    return int(number)


class OscApi:
    """Decodes packets, answers them, and turns /stemquery/separate into journal jobs."""

    def __init__(self, server) -> None:
        self.server = server  # stemquery.daw_bridge.server.StemqueryServer
        self.channels: dict[str, tuple[str, ReplyChannel]] = {}  # job id → (req id, channel)
        self._lock = threading.Lock()
        self.handlers: dict[str, Callable[[list, ReplyChannel], None]] = {
            f"{PREFIX}/separate": self._separate,
            f"{PREFIX}/cancel": self._cancel,
            f"{PREFIX}/status": self._status,
            f"{PREFIX}/ping": self._ping,
            f"{PREFIX}/subscribe": self._subscribe,
        }

    # -- packets ------------------------------------------------------------------------------------------------
    def handle_packet(self, data: bytes, reply: ReplyChannel) -> None:
        try:
            messages = list(self._messages(data))
        except Exception as exc:  # python-osc raises ParseError, but also struct/unicode errors on garbage
            self.refuse(reply, "", "parse_error", f"not an OSC packet ({exc})"[:500], what=f"{len(data)} bytes")
            return
        for message in messages:
            self._handle_message(message, reply)

    def _messages(self, data: bytes):
        if OscBundle.dgram_is_bundle(data):
            for timed in OscPacket(data).messages:
                yield timed.message
        else:
            yield OscMessage(data)

    def _handle_message(self, message: OscMessage, reply: ReplyChannel) -> None:
        args = list(message.params)
        req_id = args[0] if args and isinstance(args[0], str) else ""
        handler = self.handlers.get(message.address)
        try:
            args, reply = redirect(args, reply)  # first, so that every answer, errors too, goes to reply_port
            if handler is None:
                raise OscRequestError(f"unknown address {message.address[:200]}; see docs/osc.md")
            handler(args, reply)
        except StemqueryError as exc:
            self.refuse(reply, req_id, exc.code, str(exc), what=message.address)
        except Exception as exc:
            log.exception("OSC handler for %s failed", message.address)
            self.refuse(reply, req_id, "internal", f"{type(exc).__name__}: {exc}", what=message.address)

    @staticmethod
    def refuse(reply: ReplyChannel, req_id: str, code: str, message: str, *, what: str) -> None:
        """Answer a refused request with /stemquery/error, and log it."""
        log.warning("refused %s (req %r), answered on %s: %s: %s", what[:200], req_id[:100], reply, code,
                    message[:500])
        reply.send(f"{PREFIX}/error", req_id[:200], code, message[:1000])

    # -- addresses ----------------------------------------------------------------------------------------------
    def _separate(self, args: list, reply: ReplyChannel) -> None:
        req_id = _string(args, 0, "req_id")
        raw = {"mix": _string(args, 1, "mix"), "query": _string(args, 2, "query"),
               "out_dir": _string(args, 3, "out_dir") or None}
        options = args[4:]
        if len(options) % 2:
            raise OscRequestError("options must come as key value pairs")
        query_range = {}
        for key, value in zip(options[::2], options[1::2]):
            if not isinstance(key, str) or key not in OPTION_KEYS:
                raise OscRequestError(f"unknown option {key!r}; options: {', '.join(sorted(OPTION_KEYS))}")
            if key == "reply_port":
                continue  # an earlier pair of two: `redirect` applied the last one
            elif key in ("query_start", "query_end"):
                try:
                    query_range[key] = float(value)
                except (TypeError, ValueError):
                    raise OscRequestError(f"{key} must be seconds, got {value!r}") from None
            elif key in ("steps", "bit_depth"):
                raw[key] = _int(value, key)
            elif key == "stem":  # repeatable: one more stem each time
                raw.setdefault("stems", []).append(_string([value], 0, "stem"))
            else:
                raw[key] = value
        if query_range:
            if set(query_range) != {"query_start", "query_end"}:
                raise OscRequestError("give both query_start and query_end")
            raw["query_ranges"] = [[query_range["query_start"], query_range["query_end"]]]
        spec = self.server.prepare_spec(validate_spec(raw), base=None, default_out=None)
        job_id = f"osc-{uuid.uuid4().hex[:12]}"
        with self._lock:
            self.channels[job_id] = (req_id, reply)
        self.server.submit(job_id, source="osc", spec=spec, req_id=req_id, reply=reply.persistent())
        reply.send(f"{PREFIX}/accepted", req_id, job_id)

    def _cancel(self, args: list, reply: ReplyChannel) -> None:
        req_id, job_id = _string(args, 0, "req_id"), _string(args, 1, "job")
        if not self.server.cancel(job_id):
            raise OscRequestError(f"job {job_id[:100]} is not queued or running")
        reply.send(f"{PREFIX}/cancelled", req_id, job_id)

    def _status(self, args: list, reply: ReplyChannel) -> None:
        req_id = _string(args, 0, "req_id", optional=True)
        status = self.server.status()
        reply.send(f"{PREFIX}/status", req_id, status["queue"], status["device"], ",".join(status["engines"]),
                   status["running"] or "")

    def _ping(self, args: list, reply: ReplyChannel) -> None:
        reply.send(f"{PREFIX}/pong", self.server.version, self.server.status()["device"])

    def _subscribe(self, args: list, reply: ReplyChannel) -> None:
        if not args:
            raise OscRequestError("missing argument 1 (port:i)")
        port = _int(args[0], "port")
        if not 1 <= port <= 65535:
            raise OscRequestError(f"port {port} is not a port number")
        host = reply.host if isinstance(reply, UdpReply) else "127.0.0.1"
        self.server.journal.add_subscriber(host, port)
        reply.send(f"{PREFIX}/subscribed", port)

    def announce_startup(self, sock: socket.socket) -> None:
        """Tell every client that ever subscribed that a (re)started server is listening."""
        for host, port in self.server.journal.subscribers():
            UdpReply(sock, host, port).send(f"{PREFIX}/startup", self.server.version, self.server.status()["device"])

    # -- job events → replies -----------------------------------------------------------------------------------
    def channel_for(self, job: Job) -> tuple[str, ReplyChannel] | None:
        with self._lock:
            found = self.channels.get(job.id)
        if found is None and job.reply and self.server.udp_socket is not None:
            found = (job.req_id, UdpReply(self.server.udp_socket, job.reply["host"], job.reply["port"]))
        return found

    def on_event(self, event: str, job: Job, **data) -> None:
        if job.source != "osc":
            return
        found = self.channel_for(job)
        if found is None:
            return
        req_id, channel = found
        if event == "progress":
            channel.send(f"{PREFIX}/progress", req_id, job.id, float(data["fraction"]), data["stage"])
        elif event == "done":
            for warning in job.warnings:
                channel.send(f"{PREFIX}/warning", req_id, job.id, warning)
            for name, path in job.stems.items():
                channel.send(f"{PREFIX}/stem", req_id, name, path)
            channel.send(f"{PREFIX}/done", req_id, job.id)
        elif event in ("failed", "cancelled"):
            error = job.error or {"code": "cancelled", "message": f"job {job.id} was cancelled"}
            channel.send(f"{PREFIX}/error", req_id, error["code"], error["message"])
        if event in ("done", "failed", "cancelled"):
            with self._lock:
                self.channels.pop(job.id, None)


class _UdpHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        data, sock = self.request
        host, port = self.client_address[:2]
        self.server.api.handle_packet(data, UdpReply(sock, host, port))


class _TcpHandler(socketserver.BaseRequestHandler):
    """An OSC stream, framed as the client's first byte says: 0xC0 (or a packet's own '/' or '#') SLIP, as OSC 1.1
    and python-osc send; 0x00 a 4-byte big-endian length before each packet, as OSC 1.0 and liblo's osc.tcp://
    send. Replies go back on the same connection in the same framing."""

    def handle(self) -> None:
        try:
            first = self.request.recv(1, socket.MSG_PEEK)
            if not first:
                return
            if first == b"\x00":
                self._serve(TcpReply(self.request, length_frame), self._length_frames)
            elif first in (slip.END, b"/", b"#"):
                self._serve(TcpReply(self.request, slip_frame), self._slip_frames)
            else:
                OscApi.refuse(TcpReply(self.request), "", "parse_error",
                              f"unknown TCP framing (first byte 0x{first[0]:02x}): send SLIP frames (OSC 1.1, "
                              "0xC0 ... 0xC0) or 4-byte big-endian length-prefixed packets (OSC 1.0)",
                              what="tcp stream")
        except OSError:
            pass

    def _serve(self, reply: TcpReply, frames) -> None:
        try:
            for packet in frames(reply):
                self.server.api.handle_packet(packet, reply)
        finally:
            reply.open = False

    def _chunks(self):
        while chunk := self.request.recv(65536):
            yield chunk

    def _slip_frames(self, reply: TcpReply):
        buffer = b""
        for chunk in self._chunks():
            buffer += chunk
            *frames, buffer = buffer.split(slip.END)
            for frame in filter(None, frames):
                try:
                    yield slip.decode(slip.END + frame + slip.END)
                except Exception:
                    OscApi.refuse(reply, "", "parse_error", "bad SLIP framing", what="tcp frame")
            if len(buffer) > MAX_TCP_FRAME:
                OscApi.refuse(reply, "", "parse_error", f"frame longer than {MAX_TCP_FRAME} bytes", what="tcp frame")
                return

    def _length_frames(self, reply: TcpReply):
        buffer = b""
        for chunk in self._chunks():
            buffer += chunk
            while len(buffer) >= 4:
                (size,) = struct.unpack(">I", buffer[:4])
                if size > MAX_TCP_FRAME:
                    OscApi.refuse(reply, "", "parse_error", f"packet of {size} bytes is longer than {MAX_TCP_FRAME}",
                                  what="tcp frame")
                    return
                if len(buffer) < 4 + size:
                    break
                packet, buffer = buffer[4: 4 + size], buffer[4 + size:]
                yield packet


class OscUdpServer(socketserver.ThreadingUDPServer):
    daemon_threads = True
    max_packet_size = 65535

    def __init__(self, address, api: OscApi) -> None:
        self.api = api
        super().__init__(address, _UdpHandler)


class OscTcpServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address, api: OscApi) -> None:
        self.api = api
        super().__init__(address, _TcpHandler)
