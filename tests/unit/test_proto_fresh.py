"""The generated gRPC/protobuf code in mesh/api matches mesh/proto.

Regenerates into a temporary directory with the pinned generators and compares byte for byte,
so editing a .proto without running ``hack/gen-proto.sh`` fails the build.
"""

from __future__ import annotations

import filecmp
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _files(d: Path) -> set[str]:
    return {str(p.relative_to(d)) for p in d.rglob("*") if p.is_file() and "__pycache__" not in
            p.parts}


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    subprocess.run([str(ROOT / "hack" / "gen-proto.sh"), str(tmp_path)], check=True, cwd=ROOT)
    committed = ROOT / "mesh" / "api"
    assert _files(tmp_path) == _files(committed), "run hack/gen-proto.sh and commit the result"
    stale = [f for f in sorted(_files(tmp_path))
             if not filecmp.cmp(tmp_path / f, committed / f, shallow=False)]
    assert not stale, f"stale generated code {stale}: run hack/gen-proto.sh and commit"


def test_generated_modules_import() -> None:
    from mesh.api.ambit.v1 import ca_pb2, ca_pb2_grpc, state_pb2, state_pb2_grpc

    req = ca_pb2.CreateCertificateRequest(csr_pem="x", ttl_seconds=60)
    assert ca_pb2.CreateCertificateRequest.FromString(req.SerializeToString()) == req
    assert hasattr(ca_pb2_grpc, "CertificateServiceStub")
    assert hasattr(state_pb2_grpc, "StateServiceStub")
    assert state_pb2.Protocol.PROTOCOL_TCP == 1
