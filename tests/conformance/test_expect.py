"""The conformance judge itself (tests/conformance/expect.py): a table of results it must
accept and reject, so a passing tier means the expectations were checked."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conformance.expect import Case, Expect, Location, Req, judge

OK_BODY = {"pod": "echo-v1", "path": "/one/two", "headers": {
    "x-header-add": ["some-other-value", "add-appends-values"], "x-set": ["v"]}}


def result(status: int | None = 200, headers: dict[str, list[str]] | None = None,
           body: Any = None) -> dict[str, Any]:
    return {"status": status, "headers": headers or {}, "body": body or OK_BODY}


REDIRECT = Case("r", Req("echo", "/port?x=1"), Expect(302, redirect=Location(port="8083")))


@pytest.mark.parametrize(("case", "res", "problem"), [
    (Case("a", Req(), Expect(backend="echo-v1", path="/one/two", request_headers={
        "X-Header-Add": "some-other-value,add-appends-values"})), result(), None),
    (Case("a", Req(), Expect(status=404)), result(), "status 200"),
    (Case("a", Req(), Expect(backend="echo-v2")), result(), "answered by 'echo-v1'"),
    (Case("a", Req(), Expect(path="/one")), result(), "the backend saw path '/one/two'"),
    (Case("a", Req(), Expect(request_headers={"x-header-add": "add-appends-values"})),
     result(), "the backend saw header x-header-add"),
    (Case("a", Req(), Expect(absent_request_headers=("X-Set",))), result(),
     "the backend saw header X-Set"),
    (Case("a", Req(), Expect(response_headers={"X-Header-Set": "set"})),
     result(headers={"x-header-set": ["set"]}), None),
    (Case("a", Req(), Expect(response_headers={"X-Header-Set": "set"})), result(),
     "response header X-Header-Set: None"),
    (Case("a", Req(), Expect(absent_response_headers=("x-header-set",))),
     result(headers={"X-Header-Set": ["set"]}), "response header x-header-set is set"),
    (Case("a", Req(), Expect()), result(body="plain"), "not JSON"),
    (REDIRECT, result(302, {"location": ["http://echo:8083/port"]}), None),
    (REDIRECT, result(302, {"location": ["http://echo/port"]}), "port ''"),
    (REDIRECT, result(302), "no Location"),
    (Case("r", Req("echo", "/a"), Expect(301, redirect=Location(scheme="https"))),
     result(301, {"location": ["https://echo/a"]}), None),
    (Case("r", Req("echo", "/a"), Expect(301, redirect=Location(scheme="https"))),
     result(301, {"location": ["https://echo:443/a"]}), None),
    (Case("r", Req("echo", "/a"), Expect(301, redirect=Location(scheme="https"))),
     result(301, {"location": ["https://echo:80/a"]}), "expected none or 443"),
    (Case("r", Req("echo", "/a"), Expect(302, redirect=Location())),
     result(302, {"location": ["https://echo/a"]}), "scheme 'https'"),
    (Case("r", Req("echo", "/a"), Expect(302, redirect=Location(host="example.org"))),
     result(302, {"location": ["http://echo/a"]}), "host 'echo'"),
    (Case("r", Req("echo", "/full/x"), Expect(302, redirect=Location(path="/new"))),
     result(302, {"location": ["http://echo/full/x"]}), "path '/full/x'"),
])
def test_judge(case: Case, res: dict[str, Any], problem: str | None) -> None:
    got = judge(case, res)
    if problem is None:
        assert got is None
    else:
        assert got is not None and problem in got, got


def test_request_host_and_port() -> None:
    assert Req("echo").name_and_port == ("echo", 80)
    assert Req("echo-v1:8080").name_and_port == ("echo-v1", 8080)
    assert Req("echo:7070", protocol="grpc").name_and_port == ("echo", 7070)
    assert Req("echo", protocol="grpc").name_and_port == ("echo", 7070)
    assert Req("10.244.2.3:8080").name_and_port == ("10.244.2.3", 8080)
