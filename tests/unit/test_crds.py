"""The CRDs in deploy/daemonset/crds: valid CRD structure, and schemas that fit what we parse.

Why these checks: a CRD is only installable with a *structural* schema (every node typed,
``items`` on arrays, no ``properties`` beside ``additionalProperties``), and the API server
*prunes* fields a structural schema does not declare, silently. A pruned field would change
a policy's meaning before the ztunnel ever saw it (a pruned ``methods`` turns "GET only" into
"everything"), so every field the ztunnel's parser knows, L7 ones included, must be declared.
The examples of docs/state-file.md must be accepted, and bad values rejected.

Full offline validation with the API server's own code is the install issue's job; here a
small validator covers the OpenAPI subset the two CRDs use.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from mesh.state.parse import (
    L7_OPERATION_FIELDS,
    parse_authorization_spec,
    parse_peer_authentication_spec,
)

ROOT = Path(__file__).resolve().parents[2]
CRDS = ROOT / "deploy" / "daemonset" / "crds"
GROUP = "security.ambit.dev"
EXPECTED = {"authorizationpolicies": "AuthorizationPolicy",
            "peerauthentications": "PeerAuthentication"}


def load(plural: str) -> dict[str, Any]:
    doc = yaml.safe_load((CRDS / f"{plural}.yaml").read_text())
    assert isinstance(doc, dict)
    return doc


def spec_schema(plural: str) -> dict[str, Any]:
    (version,) = load(plural)["spec"]["versions"]
    schema = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert isinstance(schema, dict)
    return schema


def structural_problems(node: Any, path: str) -> list[str]:
    """The structural-schema rules of apiextensions.k8s.io/v1 that apply to these CRDs."""
    if not isinstance(node, dict):
        return [f"{path}: not a schema object"]
    problems: list[str] = []
    if node.get("x-kubernetes-preserve-unknown-fields") or node.get(
            "x-kubernetes-int-or-string"):
        return problems
    t = node.get("type")
    if t not in ("object", "array", "string", "integer", "number", "boolean"):
        problems.append(f"{path}: type missing or unknown ({t!r})")
    if "properties" in node and "additionalProperties" in node:
        problems.append(f"{path}: properties and additionalProperties are exclusive")
    if ("properties" in node or "additionalProperties" in node) and t != "object":
        problems.append(f"{path}: properties on a non-object")
    if t == "array" and "items" not in node:
        problems.append(f"{path}: array without items")
    for key in node:
        if key in ("$ref", "definitions", "dependencies", "id", "patternProperties",
                   "uniqueItems", "additionalItems"):
            problems.append(f"{path}: {key} is not allowed in a CRD schema")
    for name, sub in (node.get("properties") or {}).items():
        problems += structural_problems(sub, f"{path}.{name}")
    if isinstance(node.get("additionalProperties"), dict):
        problems += structural_problems(node["additionalProperties"], f"{path}.*")
    if "items" in node:
        problems += structural_problems(node["items"], f"{path}[]")
    return problems


def validate(value: Any, schema: dict[str, Any], path: str = "spec") -> list[str]:
    """Errors for ``value``; a field the schema does not declare counts (it would be pruned)."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    t = schema.get("type")
    types = {"object": dict, "array": list, "string": str, "boolean": bool, "integer": int}
    if t in types and (not isinstance(value, types[t]) or
                       (t == "integer" and isinstance(value, bool))):
        return [f"{path}: expected {t}, got {type(value).__name__}"]
    errors: list[str] = []
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: {value!r} not in {schema['enum']}")
    if "pattern" in schema and not re.search(schema["pattern"], value):
        errors.append(f"{path}: {value!r} does not match {schema['pattern']}")
    if t == "object":
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        for k, v in value.items():
            if props is not None and k in props:
                errors += validate(v, props[k], f"{path}.{k}")
            elif isinstance(extra, dict):
                errors += validate(v, extra, f"{path}.{k}")
            elif props is not None:
                errors.append(f"{path}.{k}: not in the schema (would be pruned)")
    if t == "array":
        for i, v in enumerate(value):
            errors += validate(v, schema["items"], f"{path}[{i}]")
    return errors


def doc_examples() -> dict[str, list[dict[str, Any]]]:
    """The policy specs of docs/state-file.md's example."""
    text = (ROOT / "docs" / "state-file.md").read_text()
    block = re.search(r"```yaml\n(.*?)```", text, re.S)
    assert block is not None
    doc = yaml.safe_load(block.group(1))
    return {"authorizationpolicies": [p["spec"] for p in doc["authorizationPolicies"]],
            "peerauthentications": [p["spec"] for p in doc["peerAuthentications"]]}


@pytest.mark.parametrize("plural", sorted(EXPECTED))
def test_crd_structure(plural: str) -> None:
    crd = load(plural)
    assert crd["apiVersion"] == "apiextensions.k8s.io/v1"
    assert crd["kind"] == "CustomResourceDefinition"
    assert crd["metadata"]["name"] == f"{plural}.{GROUP}"
    spec = crd["spec"]
    assert (spec["group"], spec["scope"]) == (GROUP, "Namespaced")
    kind = EXPECTED[plural]
    assert spec["names"] == {**spec["names"], "kind": kind, "listKind": f"{kind}List",
                             "plural": plural, "singular": kind.lower()}
    (version,) = spec["versions"]
    assert (version["name"], version["served"], version["storage"]) == ("v1", True, True)
    root = version["schema"]["openAPIV3Schema"]
    assert structural_problems(root, "openAPIV3Schema") == []
    assert root["properties"]["metadata"] == {"type": "object"}  # nothing else is allowed there


def test_authorization_policy_schema_declares_every_field_the_parser_reads() -> None:
    schema = spec_schema("authorizationpolicies")
    assert set(schema["properties"]) == {"selector", "action", "rules", "targetRef",
                                         "targetRefs"}
    assert schema["properties"]["action"]["enum"] == ["ALLOW", "DENY", "AUDIT"]
    rule = schema["properties"]["rules"]["items"]["properties"]
    assert set(rule) == {"from", "to", "when"}
    source = rule["from"]["items"]["properties"]["source"]["properties"]
    assert set(source) == {"principals", "notPrincipals", "namespaces", "notNamespaces",
                           "ipBlocks", "notIpBlocks", "requestPrincipals",
                           "notRequestPrincipals", "remoteIpBlocks", "notRemoteIpBlocks"}
    operation = rule["to"]["items"]["properties"]["operation"]["properties"]
    assert set(operation) == {"ports", "notPorts", *L7_OPERATION_FIELDS}


def test_peer_authentication_schema() -> None:
    schema = spec_schema("peerauthentications")
    assert set(schema["properties"]) == {"selector", "mtls", "portLevelMtls"}
    mode = schema["properties"]["mtls"]["properties"]["mode"]
    assert mode["enum"] == ["UNSET", "DISABLE", "PERMISSIVE", "STRICT"]
    assert schema["properties"]["portLevelMtls"]["additionalProperties"]["properties"][
        "mode"] == mode


@pytest.mark.parametrize("plural", sorted(EXPECTED))
def test_the_documented_examples_are_accepted_and_parse(plural: str) -> None:
    examples = doc_examples()[plural]
    assert examples
    parse = parse_authorization_spec if plural == "authorizationpolicies" \
        else parse_peer_authentication_spec
    for spec in examples:
        assert validate(spec, spec_schema(plural)) == []
        parse("example", "default", spec, "spec")  # and the ztunnel reads what it accepts


@pytest.mark.parametrize(("plural", "spec", "error"), [
    ("authorizationpolicies", {"action": "MAYBE"}, "spec.action: 'MAYBE' not in"),
    ("authorizationpolicies", {"rules": [{"to": [{"operation": {"ports": ["http"]}}]}]},
     "spec.rules[0].to[0].operation.ports[0]: 'http' does not match"),
    ("authorizationpolicies", {"rules": [{"to": [{"operation": {"ports": [8080]}}]}]},
     "spec.rules[0].to[0].operation.ports[0]: expected string"),
    ("authorizationpolicies", {"rules": [{"from": [{"source": {"users": ["x"]}}]}]},
     "spec.rules[0].from[0].source.users: not in the schema"),
    ("authorizationpolicies", {"selector": {"matchLabels": {"app": 1}}},
     "spec.selector.matchLabels.app: expected string"),
    ("peerauthentications", {"mtls": {"mode": "SOMETIMES"}}, "spec.mtls.mode: 'SOMETIMES'"),
    ("peerauthentications", {"portLevelMtls": {"9090": {"mode": "OFF"}}},
     "spec.portLevelMtls.9090.mode: 'OFF'"),
])
def test_bad_values_are_rejected(plural: str, spec: dict[str, Any], error: str) -> None:
    errors = validate(spec, spec_schema(plural))
    assert any(e.startswith(error) for e in errors), errors


def test_l7_fields_are_kept_for_the_parser_to_reject() -> None:
    spec = {"rules": [{"to": [{"operation": {"methods": ["GET"], "ports": ["80"]}}]}]}
    assert validate(spec, spec_schema("authorizationpolicies")) == []  # not pruned...
    with pytest.raises(ValueError, match=r"spec\.rules\[0\]\.to\[0\]\.operation\.methods"):
        parse_authorization_spec("p", "default", spec, "spec")  # ...so it fails closed


def test_port_level_mtls_keys_are_checked_by_cel() -> None:
    plm = spec_schema("peerauthentications")["properties"]["portLevelMtls"]
    (rule,) = plm["x-kubernetes-validations"]
    assert "65535" in rule["rule"] and rule["message"]


# --- HTTPFault (networking.ambit.dev/v1alpha1, waypoint fault injection) ---------------------

def fault_schema() -> dict[str, Any]:
    (version,) = load("httpfaults")["spec"]["versions"]
    schema = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert isinstance(schema, dict)
    return schema


def test_http_fault_crd_structure() -> None:
    crd = load("httpfaults")
    assert crd["metadata"]["name"] == "httpfaults.networking.ambit.dev"
    spec = crd["spec"]
    assert (spec["group"], spec["scope"]) == ("networking.ambit.dev", "Namespaced")
    assert spec["names"] == {**spec["names"], "kind": "HTTPFault", "listKind": "HTTPFaultList",
                             "plural": "httpfaults", "singular": "httpfault"}
    (version,) = spec["versions"]
    assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)
    root = version["schema"]["openAPIV3Schema"]
    assert structural_problems(root, "openAPIV3Schema") == []
    assert root["properties"]["metadata"] == {"type": "object"}
    (rule,) = fault_schema()["x-kubernetes-validations"]
    assert rule["rule"] == "has(self.delay) || has(self.abort)" and rule["message"]


def test_http_fault_schema_declares_what_the_parser_reads() -> None:
    from controller.waypoint.parse import parse_http_fault

    props = fault_schema()["properties"]
    assert set(props) == {"delay", "abort"}
    assert set(props["delay"]["properties"]) == {"fixedDelay", "percentage"}
    assert set(props["abort"]["properties"]) == {"httpStatus", "percentage"}
    for spec in ({"delay": {"fixedDelay": "1m30s", "percentage": 12.5}},
                 {"abort": {"httpStatus": 503}},
                 {"delay": {"fixedDelay": "500ms"}, "abort": {"httpStatus": 500,
                                                              "percentage": 1}}):
        assert validate(spec, fault_schema()) == []
        parse_http_fault("f", "default", spec)  # and the controller reads what it accepts


@pytest.mark.parametrize(("spec", "error"), [
    ({"delay": {"fixedDelay": "1.5s"}}, "spec.delay.fixedDelay: '1.5s' does not match"),
    ({"delay": {"fixedDelay": 5}}, "spec.delay.fixedDelay: expected string"),
    ({"abort": {"httpStatus": "503"}}, "spec.abort.httpStatus: expected integer"),
    ({"abort": {"httpStatus": 503, "grpcStatus": 14}},
     "spec.abort.grpcStatus: not in the schema"),
])
def test_http_fault_bad_values_are_rejected(spec: dict[str, Any], error: str) -> None:
    errors = validate(spec, fault_schema())
    assert any(e.startswith(error) for e in errors), errors


def test_http_fault_ranges_are_declared() -> None:
    props = fault_schema()["properties"]
    assert (props["abort"]["properties"]["httpStatus"]["minimum"],
            props["abort"]["properties"]["httpStatus"]["maximum"]) == (200, 599)
    for part in ("delay", "abort"):
        pct = props[part]["properties"]["percentage"]
        assert (pct["type"], pct["minimum"], pct["maximum"]) == ("number", 0, 100)
    assert props["delay"]["required"] == ["fixedDelay"]
    assert props["abort"]["required"] == ["httpStatus"]
