"""The gRPC mesh CA: who may get which certificate, what a valid CSR is, and the root store."""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from prometheus_client import CollectorRegistry

from controller.ca import CertificateAuthority
from controller.ca_service import CertificateService
from controller.ca_store import (
    CA_DIR,
    ROOT_CERT_FILE,
    ROOT_KEY_FILE,
    CaStoreError,
    load_or_create_ca,
    open_ca,
)
from mesh.api.ambit.v1 import ca_pb2, ca_pb2_grpc
from mesh.spiffe import SpiffeId
from tests.ca_fakes import InMemoryNodeDirectory

TD = "cluster.local"
WEB = SpiffeId(TD, "default", "web")
DB = SpiffeId(TD, "data", "db")


@dataclasses.dataclass
class Ca:
    service: CertificateService
    directory: InMemoryNodeDirectory
    registry: CollectorRegistry
    stub: ca_pb2_grpc.CertificateServiceAsyncStub

    def count(self, result: str) -> float:
        v = self.registry.get_sample_value("ambit_ca_requests_total", {"result": result})
        return v or 0.0

    async def request(self, csr_pem: str, token: str | None = "tok-a",
                      ttl_seconds: int = 0) -> ca_pb2.CreateCertificateResponse:
        metadata = (("authorization", f"Bearer {token}"),) if token is not None else ()
        return await self.stub.CreateCertificate(
            ca_pb2.CreateCertificateRequest(csr_pem=csr_pem, ttl_seconds=ttl_seconds),
            metadata=metadata, timeout=5)


@pytest.fixture
async def ca() -> AsyncIterator[Ca]:
    directory = InMemoryNodeDirectory()
    directory.add("node-a", "tok-a", WEB)
    directory.add("node-b", "tok-b", DB)
    registry = CollectorRegistry()
    service = CertificateService(CertificateAuthority.generate(TD), TD, directory, directory,
                                 registry, max_ttl=dt.timedelta(hours=48))
    server = grpc.aio.server()
    service.add_to_server(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield Ca(service, directory, registry, ca_pb2_grpc.CertificateServiceStub(channel))
    finally:
        await channel.close()
        await server.stop(None)


def csr_for(*uris: str, key: object | None = None, extra: list[x509.GeneralName] | None = None,
            ) -> str:
    k = key or ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
    names += extra or []
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=True)
    alg = None if isinstance(k, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(k, alg).public_bytes(serialization.Encoding.PEM).decode()  # type: ignore[arg-type]


async def refusal(ca: Ca, csr_pem: str, token: str | None = "tok-a",
                  ttl_seconds: int = 0) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await ca.request(csr_pem, token, ttl_seconds)
    return err.value


async def test_issues_for_an_identity_on_the_callers_node(ca: Ca) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    resp = await ca.request(csr_for(str(WEB), key=key))
    chain = [x509.load_pem_x509_certificate(p.encode()) for p in resp.cert_chain_pem]
    leaf, root = chain[0], ca.service.ca.cert
    assert len(chain) == 2 and chain[1] == root
    assert [x509.load_pem_x509_certificate(p.encode()) for p in resp.trust_bundle_pem] == [root]
    leaf.verify_directly_issued_by(root)
    assert leaf.public_key() == key.public_key()
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [str(WEB)]
    lifetime = leaf.not_valid_after_utc - dt.datetime.now(dt.UTC)
    assert dt.timedelta(hours=23, minutes=59) < lifetime <= dt.timedelta(hours=24)
    assert ca.count("issued") == 1


async def test_rsa_2048_is_accepted(ca: Ca) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    resp = await ca.request(csr_for(str(WEB), key=key))
    leaf = x509.load_pem_x509_certificate(resp.cert_chain_pem[0].encode())
    assert leaf.public_key() == key.public_key()


async def test_another_nodes_identity_is_refused_and_logged(
        ca: Ca, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="controller.ca"):
        err = await refusal(ca, csr_for(str(DB)))  # db runs on node-b; caller is node-a
    assert err.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "node node-a runs no workload with identity spiffe://cluster.local/ns/data/sa/db" \
        in (err.details() or "")
    assert ca.count("permission_denied") == 1 and ca.count("issued") == 0
    assert any("PERMISSION_DENIED" in r.getMessage() and "node-a" in r.getMessage()
               for r in caplog.records)
    # The node that does run db gets it.
    await ca.request(csr_for(str(DB)), token="tok-b")
    assert ca.count("issued") == 1


async def test_a_flood_of_refused_requests_is_no_log_flood(
        ca: Ca, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="controller.ca"):
        for _ in range(50):
            err = await refusal(ca, csr_for(str(WEB)), token="forged")
            assert err.code() is grpc.StatusCode.UNAUTHENTICATED
        err = await refusal(ca, csr_for(str(DB)))  # another code gets its own line
        assert err.code() is grpc.StatusCode.PERMISSION_DENIED
    assert ca.count("unauthenticated") == 50
    lines = [r.getMessage() for r in caplog.records if "refused certificate" in r.getMessage()]
    assert len(lines) == 2, lines
    assert "UNAUTHENTICATED" in lines[0] and "PERMISSION_DENIED" in lines[1]


@pytest.mark.parametrize("token", [None, "", "forged"])
async def test_missing_or_bad_token_is_unauthenticated(ca: Ca, token: str | None) -> None:
    err = await refusal(ca, csr_for(str(WEB)), token=token)
    assert err.code() is grpc.StatusCode.UNAUTHENTICATED
    assert "token" in (err.details() or "")
    assert ca.count("unauthenticated") == 1


async def test_token_scheme_must_be_bearer(ca: Ca) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await ca.stub.CreateCertificate(ca_pb2.CreateCertificateRequest(
            csr_pem=csr_for(str(WEB))), metadata=(("authorization", "Basic tok-a"),))
    assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED


def _tampered(csr_pem: str) -> str:
    der = bytearray(x509.load_pem_x509_csr(csr_pem.encode()).public_bytes(
        serialization.Encoding.DER))
    der[-1] ^= 0x01  # last byte of the signature
    csr = x509.load_der_x509_csr(bytes(der))
    return csr.public_bytes(serialization.Encoding.PEM).decode()


BAD_CSRS = {
    "not PEM": ("hello", "not a PEM certificate request"),
    "empty": ("", "csr_pem is empty"),
    "bad signature": (_tampered(csr_for(str(WEB))), "signature does not verify"),
    "no SAN": (csr_for(), "no subjectAltName"),
    "two URIs": (csr_for(str(WEB), str(SpiffeId(TD, "default", "other"))),
                 "exactly one URI SAN"),
    "DNS SAN": (csr_for(str(WEB), extra=[x509.DNSName("web.default")]), "non-URI SANs"),
    "not spiffe": (csr_for("https://example.com/x"), "not a SPIFFE ID"),
    "not a workload id": (csr_for("spiffe://cluster.local/ns/default"),
                          "not a workload identity"),
    "other trust domain": (csr_for("spiffe://evil.example/ns/default/sa/web"),
                           "trust domain 'evil.example' presented "
                           "(spiffe://evil.example/ns/default/sa/web), expected "
                           "'cluster.local'"),
    "rsa 1024": (csr_for(str(WEB), key=rsa.generate_private_key(65537, 1024)), "too weak"),
    "p-384": (csr_for(str(WEB), key=ec.generate_private_key(ec.SECP384R1())),
              "EC secp384r1 is not accepted"),
    "ed25519": (csr_for(str(WEB), key=ed25519.Ed25519PrivateKey.generate()),
                "is not accepted"),
    "huge": ("x" * 20_000, "more than the"),
}


@pytest.mark.parametrize("case", sorted(BAD_CSRS))
async def test_bad_csr_is_invalid_argument(ca: Ca, case: str) -> None:
    pem, message = BAD_CSRS[case]
    err = await refusal(ca, pem)
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert message in (err.details() or "")
    assert ca.count("invalid_argument") == 1 and ca.count("issued") == 0


@pytest.mark.parametrize(("requested", "expected"), [
    (0, dt.timedelta(hours=24)),  # the default
    (3600, dt.timedelta(hours=1)),
    (30 * 86400, dt.timedelta(hours=48)),  # clamped to max_ttl
])
async def test_ttl_is_defaulted_and_clamped(ca: Ca, requested: int,
                                            expected: dt.timedelta) -> None:
    before = dt.datetime.now(dt.UTC).replace(microsecond=0)
    resp = await ca.request(csr_for(str(WEB)), ttl_seconds=requested)
    leaf = x509.load_pem_x509_certificate(resp.cert_chain_pem[0].encode())
    lifetime = leaf.not_valid_after_utc - before
    assert expected <= lifetime <= expected + dt.timedelta(seconds=5)


async def test_negative_ttl_is_invalid(ca: Ca) -> None:
    err = await refusal(ca, csr_for(str(WEB)), ttl_seconds=-5)
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "ttl_seconds is -5" in (err.details() or "")


async def test_async_authenticator_and_policy_plug_in() -> None:
    class Remote:
        """Like TokenReview: answers after a network round trip."""

        async def authenticate(self, token: str) -> str | None:
            return "node-a" if token == "sa-token" else None

        async def may_issue(self, node: str, identity: SpiffeId) -> bool:
            return (node, identity) == ("node-a", WEB)

    remote = Remote()
    service = CertificateService(CertificateAuthority.generate(TD), TD, remote, remote,
                                 CollectorRegistry())
    server = grpc.aio.server()
    service.add_to_server(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = ca_pb2_grpc.CertificateServiceStub(channel)
            md = (("authorization", "Bearer sa-token"),)
            ok = await stub.CreateCertificate(
                ca_pb2.CreateCertificateRequest(csr_pem=csr_for(str(WEB))), metadata=md)
            assert ok.cert_chain_pem
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.CreateCertificate(
                    ca_pb2.CreateCertificateRequest(csr_pem=csr_for(str(DB))), metadata=md)
            assert err.value.code() is grpc.StatusCode.PERMISSION_DENIED
    finally:
        await server.stop(None)


def test_service_rejects_inconsistent_ttls() -> None:
    with pytest.raises(ValueError, match="default_ttl"):
        CertificateService(CertificateAuthority.generate(TD), TD, InMemoryNodeDirectory(),
                           InMemoryNodeDirectory(), CollectorRegistry(),
                           default_ttl=dt.timedelta(hours=2), max_ttl=dt.timedelta(hours=1))


# -- the root store -------------------------------------------------------------------------


def test_generated_root_survives_restart(tmp_path: Path) -> None:
    first = load_or_create_ca(tmp_path / "data", TD)
    ca_dir = tmp_path / "data" / CA_DIR
    assert os.stat(ca_dir / ROOT_KEY_FILE).st_mode & 0o777 == 0o600
    assert (ca_dir / ROOT_CERT_FILE).read_bytes() == first.root_pem
    assert os.stat(ca_dir).st_mode & 0o077 == 0
    assert [p.name for p in (tmp_path / "data").iterdir()] == [CA_DIR]  # no staging left
    second = load_or_create_ca(tmp_path / "data", TD)
    assert second.root_pem == first.root_pem
    assert second.key_pem == first.key_pem
    # A certificate issued before the restart verifies against the reloaded root.
    x509.load_pem_x509_certificates(first.issue(WEB).chain_pem)[0] \
        .verify_directly_issued_by(second.cert)


def test_half_a_persisted_root_is_an_error_not_a_new_root(tmp_path: Path) -> None:
    load_or_create_ca(tmp_path, TD)
    (tmp_path / CA_DIR / ROOT_KEY_FILE).unlink()
    with pytest.raises(CaStoreError, match=f"lacks {ROOT_KEY_FILE}.*restore it"):
        load_or_create_ca(tmp_path, TD)


def test_persisted_root_of_another_trust_domain_is_refused(tmp_path: Path) -> None:
    load_or_create_ca(tmp_path, "old.example")
    with pytest.raises(CaStoreError, match=r"only vouches for trust domain.*old\.example"):
        load_or_create_ca(tmp_path, TD)


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    path.chmod(0o600)
    return path


def test_user_supplied_root_files(tmp_path: Path) -> None:
    user = CertificateAuthority.generate(TD)
    cert = _write(tmp_path / "ca.pem", user.root_pem)
    key = _write(tmp_path / "ca-key.pem", user.key_pem)
    ca = open_ca(TD, data_dir=tmp_path / "data", ca_cert=cert, ca_key=key)
    assert ca.root_pem == user.root_pem
    assert not (tmp_path / "data").exists()  # a user root is not copied anywhere


def test_user_supplied_rsa_root_signs_workloads(tmp_path: Path) -> None:
    key = rsa.generate_private_key(65537, 2048)
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "corp root")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=365))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    ca = open_ca(TD, ca_cert=_write(tmp_path / "c.pem", cert.public_bytes(
        serialization.Encoding.PEM)), ca_key=_write(tmp_path / "k.pem", key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption())))
    leaf = x509.load_pem_x509_certificates(ca.issue(WEB).chain_pem)[0]
    leaf.verify_directly_issued_by(cert)


def test_user_supplied_root_problems_are_named(tmp_path: Path) -> None:
    a, b = CertificateAuthority.generate(TD), CertificateAuthority.generate(TD)
    cert = _write(tmp_path / "a.pem", a.root_pem)
    with pytest.raises(CaStoreError, match="go together"):
        open_ca(TD, data_dir=tmp_path, ca_cert=cert)
    with pytest.raises(CaStoreError, match="does not belong to the CA certificate"):
        open_ca(TD, ca_cert=cert, ca_key=_write(tmp_path / "b-key.pem", b.key_pem))
    with pytest.raises(CaStoreError, match=r"cannot read the CA from .*missing\.pem"):
        open_ca(TD, ca_cert=cert, ca_key=tmp_path / "missing.pem")
    # A workload certificate is not a CA.
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf_pem = x509.load_pem_x509_certificates(
        a.issue(WEB, public_key=leaf_key.public_key()).chain_pem)[0].public_bytes(
        serialization.Encoding.PEM)
    with pytest.raises(CaStoreError, match="is not a CA certificate"):
        open_ca(TD, ca_cert=_write(tmp_path / "leaf.pem", leaf_pem),
                ca_key=_write(tmp_path / "leaf-key.pem", leaf_key.private_bytes(
                    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption())))
    with pytest.raises(CaStoreError, match="no mesh root"):
        open_ca(TD)


async def test_authenticator_outage_is_unavailable_not_unauthenticated() -> None:
    from controller.ca_service import AuthenticatorUnavailable

    class Down:
        async def authenticate(self, token: str) -> str | None:
            raise AuthenticatorUnavailable("API server unreachable")

        def may_issue(self, node: str, identity: SpiffeId) -> bool:
            return True

    registry = CollectorRegistry()
    service = CertificateService(CertificateAuthority.generate(TD), TD, Down(), Down(),
                                 registry)
    server = grpc.aio.server()
    service.add_to_server(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = ca_pb2_grpc.CertificateServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.CreateCertificate(
                    ca_pb2.CreateCertificateRequest(csr_pem=csr_for(str(WEB))),
                    metadata=(("authorization", "Bearer t"),))
            assert err.value.code() is grpc.StatusCode.UNAVAILABLE
            assert "retry" in (err.value.details() or "")
            assert registry.get_sample_value("ambit_ca_requests_total",
                                             {"result": "unavailable"}) == 1
    finally:
        await server.stop(None)
