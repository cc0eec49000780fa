"""The CA client core the ztunnel and the waypoint agent share (``mesh/ca_client.py``), without
a CA: the retry schedule and the renewal time as tables, the token file, the one request
against a fake stub (what it sends, how refusals become ``CaError``), and the answer check's
refusal of a certificate that has already expired."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from controller.ca import CertificateAuthority
from mesh.api.ambit.v1 import ca_pb2
from mesh.ca_client import (
    CaError,
    TokenFile,
    accept_issued,
    make_csr,
    refresh_at,
    request_certificate,
    retry_delay,
)
from mesh.spiffe import SpiffeId

TD = "cluster.local"
ID = SpiffeId(TD, "default", "client")


# -- the schedule -------------------------------------------------------------------------


@dataclass(frozen=True)
class Held:
    not_after: float


class Fixed:
    """Jitter that always picks ``at`` of the way from ``a`` to ``b`` (0 = low end)."""

    def __init__(self, at: float) -> None:
        self.at = at
        self.asked: list[tuple[float, float]] = []

    def uniform(self, a: float, b: float) -> float:
        self.asked.append((a, b))
        return a + (b - a) * self.at


# failures, now, held's not_after (None: no certificate), initial, maximum, jitter, delay
SCHEDULE = [
    # Exponential from initial, full jitter value (1.0).
    (1, 0.0, None, 1.0, 60.0, 1.0, 1.0),
    (2, 0.0, None, 1.0, 60.0, 1.0, 2.0),
    (3, 0.0, None, 1.0, 60.0, 1.0, 4.0),
    (6, 0.0, None, 1.0, 60.0, 1.0, 32.0),
    # Capped at maximum, and the exponent itself is capped (no overflow after many failures).
    (7, 0.0, None, 1.0, 60.0, 1.0, 60.0),
    (10_000, 0.0, None, 1.0, 60.0, 1.0, 60.0),
    # The low end of the jitter halves it.
    (1, 0.0, None, 1.0, 60.0, 0.0, 0.5),
    (7, 0.0, None, 1.0, 60.0, 0.0, 30.0),
    # No failure yet counts as the first (never shorter than initial before jitter).
    (0, 0.0, None, 1.0, 60.0, 1.0, 1.0),
    # Other bounds (the tests' fast ones).
    (3, 0.0, None, 0.1, 0.5, 1.0, 0.4),
    (4, 0.0, None, 0.1, 0.5, 1.0, 0.5),
    # A valid certificate with 40 s left: at most a quarter of that apart...
    (7, 0.0, 40.0, 1.0, 60.0, 1.0, 10.0),
    (3, 0.0, 40.0, 1.0, 60.0, 1.0, 4.0),  # ...the schedule when it is shorter...
    (7, 36.0, 40.0, 1.0, 60.0, 1.0, 1.0),  # ...but never below initial (4 s left / 4 = 1 s)
    (7, 39.0, 40.0, 2.0, 60.0, 1.0, 2.0),
    # Expired (now at or after not_after): back to the plain schedule.
    (7, 40.0, 40.0, 1.0, 60.0, 1.0, 60.0),
    (8, 50.0, 40.0, 1.0, 60.0, 0.0, 30.0),
]


@pytest.mark.parametrize(("failures", "now", "not_after", "initial", "maximum", "jitter",
                          "delay"), SCHEDULE)
def test_retry_delay(failures: int, now: float, not_after: float | None, initial: float,
                     maximum: float, jitter: float, delay: float) -> None:
    rng = Fixed(jitter)
    held = None if not_after is None else Held(not_after)
    assert retry_delay(failures, now, held, initial, maximum, rng) == pytest.approx(delay)
    assert rng.asked == [(0.5, 1.0)]  # jittered to 50-100%, one draw


@pytest.mark.parametrize(("received_at", "not_after", "due"), [
    (1000.0, 2000.0, 1500.0),
    # The CA backdated notBefore: half of what is left from arrival, not of the whole span.
    (1000.0, 87400.0, 44200.0),
    (0.0, 4.0, 2.0),
    # Already expired on arrival (accept_issued refuses that): due at once.
    (1000.0, 1000.0, 1000.0),
])
def test_refresh_at_is_half_the_lifetime_from_arrival(received_at: float, not_after: float,
                                                      due: float) -> None:
    assert refresh_at(received_at, not_after) == due


# -- the token ----------------------------------------------------------------------------


@pytest.mark.parametrize(("content", "token", "error"), [
    ("tok\n", "tok", None),
    ("  tok  \n\n", "tok", None),
    (None, None, r"cannot read the node token file .*absent: No such file.*; join the node"),
    ("", None, r"the node token file .* is empty"),
    (" \n", None, r"the node token file .* is empty"),
])
def test_token_file(tmp_path: Path, content: str | None, token: str | None,
                    error: str | None) -> None:
    path = tmp_path / ("absent" if content is None else "token")
    if content is not None:
        path.write_text(content)
    tf = TokenFile(path, "node token", "join the node")
    if error is None:
        assert tf.read() == token
        return
    with pytest.raises(CaError, match=error) as err:
        tf.read()
    assert err.value.code == "token"


# -- the request --------------------------------------------------------------------------


class FakeStub:
    """``CreateCertificate`` that records the call and answers or raises; ``connected`` says
    whether the request asked for the stub at all."""

    def __init__(self, answer: ca_pb2.CreateCertificateResponse | BaseException) -> None:
        self.answer = answer
        self.connected = False
        self.calls: list[tuple[ca_pb2.CreateCertificateRequest, Any, float]] = []

    async def connect(self) -> Any:
        self.connected = True
        return self

    # ``timeout`` is gRPC's keyword: the request passes it.
    async def CreateCertificate(self, request: ca_pb2.CreateCertificateRequest, *,
                                metadata: Any, timeout: float) -> Any:  # noqa: ASYNC109
        self.calls.append((request, metadata, timeout))
        if isinstance(self.answer, BaseException):
            raise self.answer
        return self.answer


def refusal(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


async def call(stub: FakeStub, token: TokenFile, **kw: Any) -> Any:
    settings: dict[str, Any] = dict(ca_address="ca:15012", ttl_seconds=0, request_timeout=5.0)
    settings.update(kw)
    return await request_certificate(stub.connect, ID, token, **settings)


def token_file(tmp_path: Path, text: str = "secret-token\n") -> TokenFile:
    path = tmp_path / "token"
    path.write_text(text)
    return TokenFile(path, "node token", "join the node")


async def test_request_sends_csr_bearer_token_ttl_and_timeout(tmp_path: Path) -> None:
    answer = ca_pb2.CreateCertificateResponse(cert_chain_pem=["x"])
    stub = FakeStub(answer)
    key, resp = await call(stub, token_file(tmp_path), ttl_seconds=3600, request_timeout=7.5)
    assert resp is answer
    ((request, metadata, timeout),) = stub.calls
    assert metadata == (("authorization", "Bearer secret-token"),)
    assert timeout == 7.5 and request.ttl_seconds == 3600
    csr = x509.load_pem_x509_csr(request.csr_pem.encode())
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [str(ID)]
    csr_key = csr.public_key()
    assert isinstance(csr_key, ec.EllipticCurvePublicKey)
    assert csr_key.public_numbers() == key.public_key().public_numbers()


async def test_request_without_token_does_not_reach_the_ca(tmp_path: Path) -> None:
    stub = FakeStub(ca_pb2.CreateCertificateResponse())
    with pytest.raises(CaError, match="is empty") as err:
        await call(stub, token_file(tmp_path, "\n"))
    assert err.value.code == "token"
    assert stub.calls == [] and not stub.connected


@pytest.mark.parametrize(("status", "hints", "message"), [
    (grpc.StatusCode.UNAVAILABLE, None,
     f"CA ca:15012 did not issue a certificate for {ID}: UNAVAILABLE: connection refused"),
    (grpc.StatusCode.PERMISSION_DENIED, {"PERMISSION_DENIED": "is the pod on that node?"},
     f"CA ca:15012 did not issue a certificate for {ID}: PERMISSION_DENIED: "
     "connection refused (is the pod on that node?)"),
    # A hint for another status is not appended.
    (grpc.StatusCode.DEADLINE_EXCEEDED, {"PERMISSION_DENIED": "is the pod on that node?"},
     f"CA ca:15012 did not issue a certificate for {ID}: DEADLINE_EXCEEDED: "
     "connection refused"),
])
async def test_request_refusal_is_a_ca_error_with_the_status(
        tmp_path: Path, status: grpc.StatusCode, hints: dict[str, str] | None,
        message: str) -> None:
    stub = FakeStub(refusal(status, "connection refused"))
    with pytest.raises(CaError) as err:
        await call(stub, token_file(tmp_path), hints=hints)
    assert err.value.code == status.name
    assert str(err.value) == message


# -- the answer ---------------------------------------------------------------------------


def issue(identity: SpiffeId = ID) -> tuple[ec.EllipticCurvePrivateKey,
                                            ca_pb2.CreateCertificateResponse]:
    ca = CertificateAuthority.generate(TD)
    key, csr_pem = make_csr(identity)
    public_key = x509.load_pem_x509_csr(csr_pem.encode()).public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    issued = ca.issue(identity, ttl=dt.timedelta(hours=1), public_key=public_key)
    chain = [c.public_bytes(serialization.Encoding.PEM).decode()
             for c in x509.load_pem_x509_certificates(issued.chain_pem)]
    return key, ca_pb2.CreateCertificateResponse(cert_chain_pem=chain,
                                                 trust_bundle_pem=[ca.root_pem.decode()])


def test_accept_issued_takes_a_valid_answer_and_refuses_an_expired_one() -> None:
    key, resp = issue()
    now = dt.datetime.now(dt.UTC).timestamp()
    issued = accept_issued(ID, key, resp, now, "ca:15012")
    assert now + 3500 < issued.not_after <= now + 3600
    assert issued.serial == format(issued.leaf.serial_number, "x")
    with pytest.raises(CaError, match=r"CA ca:15012 answered for .* with an unusable "
                                      r"certificate: it expired at") as err:
        accept_issued(ID, key, resp, issued.not_after, "ca:15012")
    assert err.value.code == "bad_response"
    with pytest.raises(CaError, match="names") as err:
        accept_issued(SpiffeId(TD, "default", "other"), key, resp, now, "ca:15012")
    assert err.value.code == "bad_response"
