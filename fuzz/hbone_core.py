"""HBONE core (``ztunnel/hbone/core.py``), server side, bytes in.

Input layout: byte 0 is a policy (bit 0 accept CONNECTs, else reject them with 403; bit 1
return flow-control credit for received data; bit 2 echo received data back; bit 3 half-close
when the peer does; bit 4 start draining halfway; bit 5 reset accepted streams on their end;
bit 6 a 4 KiB stream window, so that inputs can reach the flow-control limits),
byte 1 is the number of split points (mod 8), then two bytes (big-endian) per split point;
the rest is what the client sends after a valid preface and an empty SETTINGS frame. The core
is fed that stream in pieces cut at the split points (offsets mod the stream's length).

Invariants: ``HboneConnection.receive`` and the server's calls raise nothing (the core
documents no exception: a protocol error is a ``ConnectionTerminated`` event); a rejected
request's stream is forgotten; the bytes the core wants to send are bounded by a constant plus
a small multiple of the bytes received (no amplification); the buffer accounting never goes
negative, and with every chunk acknowledged nothing stays counted as received; the inbound
flow-control windows the core keeps itself (issue 14: it parses DATA frames, h2 does not)
stay between 0 and what was advertised. The ``crash-reject-after-*`` inputs
are a fixed finding: the core answered a request after h2 had processed an RST_STREAM, a
GOAWAY or a higher stream from the same read, and h2's refusal escaped ``receive``.
"""

from __future__ import annotations

import itertools
import sys

import atheris

with atheris.instrument_imports(include=["ztunnel.hbone", "mesh.ports", "h2", "hpack"]):
    from ztunnel.hbone import events
    from ztunnel.hbone.core import HboneConnection, HboneSettings

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
DEFAULT = HboneSettings()
SMALL = HboneSettings(stream_window=4096)
# The core's own preface, SETTINGS and connection WINDOW_UPDATE, plus replies to the prefix.
OUT_BASE = 1024
# Per received byte: a 9-byte PING is answered with a 17-byte PING ack, a 9-byte HEADERS with
# a HEADERS (:status) and maybe an RST_STREAM, a DATA frame with two WINDOW_UPDATEs and its
# echo. 4x covers each of those.
OUT_PER_BYTE = 4


def _cuts(data: bytes) -> tuple[int, list[int], bytes]:
    policy = data[0] if data else 0
    n = (data[1] % 8) if len(data) > 1 else 0
    offs = [int.from_bytes(data[2 + 2 * i:4 + 2 * i], "big") for i in range(n)]
    return policy, offs, data[2 + 2 * n:]


def test_one_input(data: bytes) -> None:
    policy, offs, stream = _cuts(data)
    cuts = sorted({o % (len(stream) + 1) for o in offs} | {0, len(stream)})
    pieces = [PREFACE] + [stream[a:b] for a, b in itertools.pairwise(cuts)]
    conn = HboneConnection(client_side=False, settings=SMALL if policy & 64 else DEFAULT)
    conn.initiate()
    sent = len(conn.data_to_send())
    received = 0
    for i, piece in enumerate(pieces):
        if policy & 16 and i == len(pieces) // 2:
            conn.draining = True
        received += len(piece)
        for ev in conn.receive(piece):
            # Events come in a batch: a later one (RST_STREAM) may already have ended the
            # stream an earlier one names; the calls below must tolerate that.
            if isinstance(ev, events.ConnectRequest):
                if policy & 1:
                    conn.accept_stream(ev.stream_id)
                else:
                    conn.reject_stream(ev.stream_id, 403)
            elif isinstance(ev, events.DataReceived):
                if policy & 2:
                    conn.ack(ev.stream_id, ev.flow_length)
                if policy & 4:
                    conn.send(ev.stream_id, ev.data)
            elif isinstance(ev, events.StreamEnded):
                if policy & 32:
                    conn.reset(ev.stream_id)
                elif policy & 8:
                    conn.end(ev.stream_id)
            elif isinstance(ev, events.RequestRejected):
                assert not conn.has_stream(ev.stream_id), ev
        sent += len(conn.data_to_send())
        assert sent <= OUT_BASE + OUT_PER_BYTE * received, (sent, received)
        assert conn.recv_buffered >= 0 and conn.send_buffered >= 0
        if policy & 2 and not conn.terminated:
            assert conn.recv_buffered == 0, conn.recv_buffered
        assert 0 <= conn._rx_window <= conn._rx_max
        for st in conn._streams.values():
            assert 0 <= st.rx_window <= conn.settings.stream_window
        if conn.closed:
            break


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
