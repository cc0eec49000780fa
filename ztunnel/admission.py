"""Connection limits: may one more connection open? A pure decision, counters, and slots.

The ztunnel is shared by every pod on its node, so one pod or one peer must not take all of
it. Each capture listener caps how many connections may be open at once, in total and per
source (a source IP, a peer's SPIFFE identity, a local pod), and refuses the one beyond:

* ``decide`` is the rule, pure (counters in, ``Decision`` with the reason in words out) and
  tested as a table, like ``ztunnel.routing``;
* a ``Gate`` keeps the counters of one limit pair and hands out ``Slot``\\s: a context
  manager, so a connection's slot is released however its handler ends, and only once;
* ``ConnectionLimits`` holds the gates of one ztunnel and counts and logs every refusal
  (``ambit_ztunnel_connections_refused_total{listener,reason}``, and at most one log line per
  listener and reason per ``LOG_INTERVAL`` with the number left out since).

Work per connection: a dict lookup and two integer updates; nothing per byte. Limits are read
from the config at every admission, and 0 means unlimited.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from enum import StrEnum
from types import TracebackType
from typing import TYPE_CHECKING

from mesh.ratelimit import RateLimitedLog

if TYPE_CHECKING:
    from ztunnel.config import ZtunnelConfig
    from ztunnel.metrics import Metrics

log = logging.getLogger("ztunnel.limits")

# A refused connection in the access log and the Istio metrics: Envoy's "upstream overflow"
# flag, which it sets when a circuit breaker (its max_connections) refuses a connection.
OVERFLOW = "overflow"
OVERFLOW_FLAG = "UO"
LOG_INTERVAL = 10.0


class Reason(StrEnum):
    """Which limit refused a connection (the metric's ``reason`` label)."""

    TOTAL = "total"
    PER_IP = "per_ip"
    PER_IDENTITY = "per_identity"
    PER_POD = "per_pod"


# How each per-source limit names its source in a message.
_SOURCE = {Reason.PER_IP: "from source IP", Reason.PER_IDENTITY: "from identity",
           Reason.PER_POD: "from pod"}


@dataclass(frozen=True)
class Limit:
    """One cap: how many may be open at once (0 = unlimited), and the setting that raises it
    (a ``ZtunnelConfig`` field; the flag is the same name with dashes)."""

    value: int
    setting: str

    def reached(self, open_now: int) -> bool:
        return self.value > 0 and open_now >= self.value

    def named(self) -> str:
        return f"limit {self.value}, {self.setting} / --{self.setting.replace('_', '-')}"


@dataclass(frozen=True)
class Decision:
    admitted: bool
    reason: Reason | None = None
    message: str = ""  # why it was refused, in words


ADMIT = Decision(True)


def decide(source: str, open_from_source: int, open_total: int, per_source: Limit | None,
           total: Limit | None, reason: Reason) -> Decision:
    """Admit one more connection from ``source`` (counted under the per-source ``reason``)
    when ``open_from_source`` and ``open_total`` connections are already open?

    The source's own limit is checked first: a source at its cap is told so whatever the
    total, since it alone caused it. ``None`` or a 0 limit never refuses."""
    if per_source is not None and per_source.reached(open_from_source):
        return Decision(False, reason, f"{open_from_source} connections already open "
                        f"{_SOURCE.get(reason, 'from')} {source} ({per_source.named()})")
    if total is not None and total.reached(open_total):
        return Decision(False, Reason.TOTAL, f"{open_total} connections already open in "
                        f"total ({total.named()})")
    return ADMIT


class Slot:
    """One admitted connection's place in a gate (or a refusal, if not ``admitted``).

    ``with gate.acquire(key) as slot:`` releases it when the block ends, however it ends;
    ``release`` is idempotent, so an early explicit release is harmless."""

    __slots__ = ("_gate", "_key", "decision")

    def __init__(self, gate: Gate | None, key: Hashable, decision: Decision) -> None:
        self._gate = gate
        self._key = key
        self.decision = decision

    @property
    def admitted(self) -> bool:
        return self.decision.admitted

    def release(self) -> None:
        gate, self._gate = self._gate, None
        if gate is not None:
            gate._release(self._key)

    def __enter__(self) -> Slot:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


RefusedHook = Callable[[str, Decision, str], None]


class Gate:
    """The open-connection counters of one listener stage: per source key and in total.

    ``limits`` returns the current (per-source, total) limits, either None when that stage
    has no such limit; ``on_refused(listener, decision, peer)`` records a refusal."""

    def __init__(self, listener: str, reason: Reason,
                 limits: Callable[[], tuple[Limit | None, Limit | None]],
                 on_refused: RefusedHook) -> None:
        self.listener = listener
        self.reason = reason
        self._limits = limits
        self._on_refused = on_refused
        self.total = 0
        self.by_key: dict[Hashable, int] = {}

    def acquire(self, key: Hashable, peer: str = "") -> Slot:
        """A slot for one more connection from ``key``, or a refused one (then counted and
        logged, naming ``peer`` or the key). Use it in a ``with`` block."""
        per_source, total = self._limits()
        decision = decide(str(key), self.by_key.get(key, 0), self.total, per_source, total,
                          self.reason)
        if not decision.admitted:
            self._on_refused(self.listener, decision, peer or str(key))
            return Slot(None, key, decision)
        self.total += 1
        self.by_key[key] = self.by_key.get(key, 0) + 1
        return Slot(self, key, decision)

    def _release(self, key: Hashable) -> None:
        self.total -= 1
        n = self.by_key[key] - 1
        if n:
            self.by_key[key] = n
        else:
            del self.by_key[key]  # no entry per source that has gone: the dict stays small


class ConnectionLimits:
    """The gates of one ztunnel, with their limits read from its config at each admission:

    * ``hbone_accept``: inbound HBONE per source IP and in total, at accept, before
      the TLS handshake;
    * ``hbone_identity``: inbound HBONE per peer SPIFFE identity, after the handshake;
    * ``plaintext``: inbound plaintext (15006) per source IP and in total;
    * ``outbound``: captured outbound (15001) per local source pod;
    * ``socks5``: SOCKS5 (15080) in total.
    """

    def __init__(self, config: ZtunnelConfig, metrics: Metrics,
                 interval: float = LOG_INTERVAL) -> None:
        self.config = config
        self.metrics = metrics
        self.log = RateLimitedLog(log, interval, what="refused")
        c = config

        def lim(name: str) -> Limit:
            return Limit(getattr(c, name), name)

        refused = self._refused
        self.hbone_accept = Gate("inbound", Reason.PER_IP, lambda: (
            lim("max_hbone_connections_per_ip"), lim("max_hbone_connections")), refused)
        self.hbone_identity = Gate("inbound", Reason.PER_IDENTITY, lambda: (
            lim("max_hbone_connections_per_identity"), None), refused)
        self.plaintext = Gate("inbound_plaintext", Reason.PER_IP, lambda: (
            lim("max_plaintext_connections_per_ip"), lim("max_plaintext_connections")), refused)
        self.outbound = Gate("outbound", Reason.PER_POD, lambda: (
            lim("max_outbound_connections_per_pod"), None), refused)
        self.socks5 = Gate("socks5", Reason.TOTAL, lambda: (
            None, lim("max_socks5_connections")), refused)

    def _refused(self, listener: str, decision: Decision, peer: str) -> None:
        assert decision.reason is not None
        self.metrics.connections_refused.labels(listener, decision.reason.value).inc()
        self.log.log((listener, decision.reason), "%s: refused a connection from %s: %s",
                     listener, peer, decision.message)
