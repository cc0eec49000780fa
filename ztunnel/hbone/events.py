"""Events the HBONE core emits; the adapters react to these and nothing else."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ConnectRequest:
    """Server side: a peer asked to open a tunnel to ``authority`` (``ip:port``)."""

    stream_id: int
    authority: str
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RequestRejected:
    """Server side: a malformed or non-CONNECT request, already answered by the core."""

    stream_id: int
    status: int
    reason: str
    # Set when a limit refused it (a metric reason, e.g. too_many_pending_streams): the
    # adapter reports it as such, rate-limited, not as a bad request.
    cause: str = ""


@dataclass(frozen=True)
class StreamAccepted:
    """Client side: the peer answered 2xx; the tunnel carries bytes from now on."""

    stream_id: int


@dataclass(frozen=True)
class StreamRefused:
    """Client side: the peer answered with a non-2xx status."""

    stream_id: int
    status: int


@dataclass(frozen=True)
class DataReceived:
    """Tunnel bytes. Call ``ack(stream_id, flow_length)`` once they are delivered."""

    stream_id: int
    data: bytes
    flow_length: int


@dataclass(frozen=True)
class StreamEnded:
    """The peer half-closed the tunnel (TCP FIN)."""

    stream_id: int


@dataclass(frozen=True)
class StreamReset:
    """The tunnel was aborted (TCP RST), by the peer or by the core on a stream error."""

    stream_id: int
    error_code: int


@dataclass(frozen=True)
class StreamWritable:
    """A stream whose send buffer was above the high-water mark has drained below it."""

    stream_id: int


@dataclass(frozen=True)
class ConnectionTerminated:
    """GOAWAY received or a protocol error: no new streams; ``fatal`` means close now."""

    error_code: int
    reason: str
    fatal: bool
    last_stream_id: int = 0
    # Why we ended it, as a metric reason (frame_too_large, continuation_flood, ...); "" when
    # the peer sent GOAWAY.
    cause: str = ""


Event = (
    ConnectRequest
    | RequestRejected
    | StreamAccepted
    | StreamRefused
    | DataReceived
    | StreamEnded
    | StreamReset
    | StreamWritable
    | ConnectionTerminated
)
