"""The mesh root's Secret and the ``ambit-ca-root`` ConfigMap (``controller.k8s_ca``): reading a
Secret as the API serves it, with errors that name the Secret and the key, and the ConfigMap
plan."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from controller.ca import CertificateAuthority
from controller.ca_store import CaStoreError
from controller.k8s_ca import (
    ca_from_secret,
    ca_root_configmap,
    parse_secret_ref,
    plan_ca_root,
    secret_body,
)

TD = "cluster.local"
CA = CertificateAuthority.generate(TD)
OTHER = CertificateAuthority.generate(TD)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def secret(data: dict[str, str]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": "ambit-ca", "namespace": "ambit-system"}, "data": data}


@pytest.mark.parametrize(("text", "expected"), [
    ("ambit-system/ambit-ca", ("ambit-system", "ambit-ca")),
    ("mesh/root.v2", ("mesh", "root.v2")),
])
def test_secret_ref(text: str, expected: tuple[str, str]) -> None:
    assert parse_secret_ref(text) == expected


@pytest.mark.parametrize(("text", "error"), [
    ("ambit-ca", "not NAMESPACE/NAME"),
    ("/ambit-ca", "not NAMESPACE/NAME"),
    ("ambit-system/", "not NAMESPACE/NAME"),
    ("Ambit/ambit-ca", "not a namespace name"),
    ("ambit-system/a/b", "not a Secret name"),
    ("ambit-system/CA", "not a Secret name"),
])
def test_bad_secret_ref(text: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        parse_secret_ref(text)


def test_a_created_secret_loads_back_to_the_same_root() -> None:
    body = secret_body("ambit-system", "ambit-ca", CA)
    assert body["type"] == "Opaque"
    assert set(body["data"]) == {"root-cert.pem", "root-key.pem"}
    assert body["metadata"]["labels"]["app.kubernetes.io/part-of"] == "ambit"
    loaded = ca_from_secret(body, TD, "ambit-system", "ambit-ca")
    assert loaded.root_pem == CA.root_pem and loaded.key_pem == CA.key_pem


def test_a_user_supplied_root_is_used_as_is() -> None:
    loaded = ca_from_secret(secret({"root-cert.pem": b64(OTHER.root_pem),
                                    "root-key.pem": b64(OTHER.key_pem),
                                    "README": b64(b"ours")}), TD, "ambit-system", "ambit-ca")
    assert loaded.root_pem == OTHER.root_pem


@pytest.mark.parametrize(("data", "fragments"), [
    ({}, ["Secret ambit-system/ambit-ca has no key root-cert.pem and no key root-key.pem",
          "keys present: none"]),
    ({"root-cert.pem": b64(CA.root_pem)}, ["has no key root-key.pem",
                                           "keys present: root-cert.pem"]),
    ({"tls.crt": b64(CA.root_pem), "tls.key": b64(CA.key_pem)},
     ["tls.crt/tls.key are not read: store the root as root-cert.pem and root-key.pem"]),
    ({"root-cert.pem": "%%%", "root-key.pem": b64(CA.key_pem)},
     ["key root-cert.pem is not valid base64"]),
    ({"root-cert.pem": b64(CA.root_pem), "root-key.pem": b64(b"hello")},
     ["key root-key.pem is not PEM"]),
    ({"root-cert.pem": b64(CA.root_pem), "root-key.pem": b64(OTHER.key_pem)},
     ["Secret ambit-system/ambit-ca (keys root-cert.pem, root-key.pem)",
      "the CA key does not belong to the CA certificate"]),
    ({"root-cert.pem": b64(CertificateAuthority.generate("other.example").root_pem),
      "root-key.pem": b64(CA.key_pem)}, ["does not belong"]),
])
def test_a_bad_secret_is_an_error_naming_the_secret_and_key(data: dict[str, str],
                                                            fragments: list[str]) -> None:
    with pytest.raises(CaStoreError) as err:
        ca_from_secret(secret(data), TD, "ambit-system", "ambit-ca")
    message = str(err.value)
    for fragment in fragments:
        assert fragment in message
    assert "it is never overwritten" in message


def test_a_root_for_another_trust_domain_is_refused() -> None:
    other = CertificateAuthority.generate("other.example")
    with pytest.raises(CaStoreError, match="only vouches for trust domain"):
        ca_from_secret(secret_body("ambit-system", "ambit-ca", other), TD, "ambit-system",
                       "ambit-ca")


PEM = CA.root_pem.decode()
LABELS = {"app.kubernetes.io/part-of": "ambit", "app.kubernetes.io/managed-by": "ambit"}


def live_cm(data: dict[str, str], labels: dict[str, str] | None = None,
            **extra: Any) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "ambit-ca-root", "namespace": "ambit-system",
                         "resourceVersion": "9", "labels": dict(LABELS if labels is None
                                                                else labels)},
            "data": data, **extra}


def test_ca_root_configmap_plan() -> None:
    desired = ca_root_configmap("ambit-system", PEM)
    assert desired["data"] == {"root-cert.pem": PEM}
    assert desired["metadata"]["labels"] == LABELS
    assert plan_ca_root(None, "ambit-system", PEM) == ("create", desired)
    assert plan_ca_root(live_cm({"root-cert.pem": PEM}), "ambit-system", PEM) is None
    # Another root (a replaced Secret): updated in place, other keys and labels kept, the
    # resourceVersion carried so a concurrent write conflicts.
    plan = plan_ca_root(live_cm({"root-cert.pem": "old", "extra": "x"}, {"team": "mesh"}),
                        "ambit-system", PEM)
    assert plan is not None
    verb, body = plan
    assert verb == "update"
    assert body["data"] == {"root-cert.pem": PEM, "extra": "x"}
    assert body["metadata"]["labels"] == {"team": "mesh", **LABELS}
    assert body["metadata"]["resourceVersion"] == "9"
    # Our labels missing: put back.
    plan = plan_ca_root(live_cm({"root-cert.pem": PEM}, {}), "ambit-system", PEM)
    assert plan is not None and plan[1]["metadata"]["labels"] == LABELS
    # A binaryData entry of the same key would make the ConfigMap invalid: dropped.
    plan = plan_ca_root(live_cm({}, binaryData={"root-cert.pem": "AA==", "b": "AA=="}),
                        "ambit-system", PEM)
    assert plan is not None and plan[1]["binaryData"] == {"b": "AA=="}
