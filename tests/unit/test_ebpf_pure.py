"""The pure parts of the eBPF backend: map key and value encodings, CIDRs, source assembly,
the loader's command line and error digest, and that bcc stays out of the agent process.

Why: the C programs and the Python side meet only through bytes in pinned maps and numbers
passed to the compiler. A byte-order slip (an address keyed in host order) or a constant that
differs between ebpf/lib/common.h and agent/capture/*.py would make capture silently miss pods,
so every encoding and every shared number is pinned down here, without a kernel.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from agent.capture import (
    bpf_sys,
    bpffs,
    ebpf,
    ebpf_maps,
    ebpf_programs,
    ebpf_support,
    kernel_headers,
    policy_routing,
)
from agent.capture.base import (
    LISTENER_INBOUND,
    LISTENER_INBOUND_PLAINTEXT,
    LISTENER_OUTBOUND,
    LISTENER_SLOTS,
    CaptureError,
    PodCounters,
)
from agent.capture.iptables import ROUTE_TABLE, RULE_PRIORITY
from mesh.ports import HBONE_PORT as INBOUND_HBONE_PORT
from mesh.ports import MARK_MASK, TPROXY_MARK


def test_ipv4_key_is_network_order() -> None:
    assert ebpf_maps.ipv4_key("10.244.1.2") == bytes([10, 244, 1, 2])
    assert ebpf_maps.ipv4_from_key(bytes([10, 244, 1, 2])) == "10.244.1.2"
    for bad in ("fd00::1", "10.244.1", "pod"):
        with pytest.raises(CaptureError):
            ebpf_maps.ipv4_key(bad)
    with pytest.raises(ValueError):
        ebpf_maps.ipv4_from_key(b"\x00" * 8)


def test_pod_value_roundtrip() -> None:
    value = ebpf_maps.pod_value(17)
    assert len(value) == ebpf_maps.MAP_LAYOUTS[ebpf_maps.MAP_PODS].value_size == 8
    assert ebpf_maps.decode_pod_value(value) == (17, ebpf_maps.POD_ENROLLED)
    assert struct.unpack("=I", value[:4]) == (17,)  # ifindex first, host order


def test_parse_exclusions() -> None:
    nets = ebpf_maps.parse_exclusions(["10.96.0.0/12", " 169.254.169.254/32", "10.96.0.0/12"])
    assert [str(n) for n in nets] == ["10.96.0.0/12", "169.254.169.254/32"]
    assert ebpf_maps.parse_exclusions([]) == ()
    for bad in ("10.96.0.1/12", "fd00::/8", "nonsense", "10.0.0.0/33"):
        with pytest.raises(CaptureError, match="excluded CIDR"):
            ebpf_maps.parse_exclusions([bad])
    too_many = [f"10.{i // 256}.{i % 256}.0/24" for i in range(ebpf_maps.MAX_EXCLUDED + 1)]
    with pytest.raises(CaptureError, match="at most"):
        ebpf_maps.parse_exclusions(too_many)


def test_lpm_key_layout() -> None:
    net = ipaddress.IPv4Network("10.96.0.0/12")
    key = ebpf_maps.lpm_key(net)
    # struct bpf_lpm_trie_key: prefix length in host order, then the address bytes.
    assert key == struct.pack("=I", 12) + bytes([10, 96, 0, 0])
    assert len(key) == ebpf_maps.MAP_LAYOUTS[ebpf_maps.MAP_EXCLUDED].key_size
    assert ebpf_maps.lpm_network(key) == net


def test_cpu_list() -> None:
    assert bpf_sys.parse_cpu_list("0\n") == [0]
    assert bpf_sys.parse_cpu_list("0-3,5,7-8") == [0, 1, 2, 3, 5, 7, 8]
    assert bpf_sys.possible_cpus() >= 1


def test_percpu_counters_are_summed() -> None:
    raw = struct.pack("=QQQ", 1, 2, 0) + struct.pack("=QQQ", 3, 0, 4)
    assert ebpf_maps.sum_percpu_counters(raw, 2) == PodCounters(captured=4, passed=2, errors=4)
    assert ebpf_maps.sum_percpu_counters(raw, 1) == PodCounters(captured=1, passed=2, errors=0)
    with pytest.raises(ValueError):
        ebpf_maps.sum_percpu_counters(raw, 3)


def test_kernel_version_and_capabilities() -> None:
    assert ebpf_support.kernel_version("6.1.0-18-amd64") == (6, 1)
    assert ebpf_support.kernel_version("5.10.0") == (5, 10)
    assert ebpf_support.kernel_version("5.4.0-150-generic") < ebpf_support.MIN_KERNEL
    with pytest.raises(ValueError):
        ebpf_support.kernel_version("linux")
    assert ebpf_support.missing_capabilities(0) == ["CAP_BPF", "CAP_NET_ADMIN"]
    assert ebpf_support.missing_capabilities(1 << 39 | 1 << 12) == []
    assert ebpf_support.missing_capabilities(1 << 21 | 1 << 12) == []  # CAP_SYS_ADMIN covers bpf
    assert ebpf_support.missing_capabilities(0x1FFFFFFFFFF) == []  # root


def test_unavailable_reasons(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(ebpf_support, "_kernel_release", lambda: "5.4.0-150-generic")
    assert "older than 5.7" in (ebpf_support.ebpf_unavailable_reason() or "")
    monkeypatch.setattr(ebpf_support, "_kernel_release", lambda: "6.1.0-test")
    monkeypatch.setattr(ebpf_support, "_effective_capabilities", lambda: 1 << 12)
    assert "CAP_BPF" in (ebpf_support.ebpf_unavailable_reason() or "")
    monkeypatch.setattr(ebpf_support, "_effective_capabilities", lambda: 0x1FFFFFFFFFF)
    monkeypatch.setattr(ebpf_support, "_BTF", tmp_path / "vmlinux")
    assert "BTF" in (ebpf_support.ebpf_unavailable_reason() or "")
    (tmp_path / "vmlinux").touch()
    monkeypatch.setattr(ebpf_support, "_MODULES", tmp_path / "modules")
    # Neither the node's headers (mounted under /host in the pod) nor the image's fallback.
    monkeypatch.setattr(kernel_headers, "HOST_MODULES", tmp_path / "host-modules")
    monkeypatch.setattr(kernel_headers, "IMAGE_USR_SRC", tmp_path / "usr-src")
    assert "kernel headers" in (ebpf_support.ebpf_unavailable_reason() or "")
    (tmp_path / "modules" / "6.1.0-test" / "build" / "include").mkdir(parents=True)
    reason = ebpf_support.ebpf_unavailable_reason()
    assert reason is None or "bcc" in reason
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bcc" else real_find_spec(name, *a))
    assert "bcc is not installed" in (ebpf_support.ebpf_unavailable_reason() or "")


def test_the_agent_never_imports_bcc() -> None:
    """Importing the backend and asking whether eBPF works must not load bcc (nor libbcc and
    its LLVM, which would stay resident): the loader process does the compiling."""
    code = ("import sys, pathlib; import agent.capture.ebpf; import agent.main; "
            "import agent.capture.ebpf_support as e; reason = e.ebpf_unavailable_reason(); "
            "maps = pathlib.Path('/proc/self/maps').read_text(); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'bcc'), "
            "'libbcc' in maps, reason)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parents[2]).stdout  # fmt: skip
    assert out.startswith("[] False "), out


def test_amalgamate_pastes_local_headers_once(tmp_path: Path) -> None:
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "a.h").write_text('#include <uapi/linux/bpf.h>\nint a;\n')
    (tmp_path / "lib" / "b.h").write_text('#include "lib/a.h"\nint b;\n')
    (tmp_path / "prog.c").write_text('#include "lib/a.h"\n#include "lib/b.h"\nint main;\n')
    text = ebpf_programs.amalgamate(tmp_path / "prog.c", tmp_path)
    assert text.count("int a;") == 1 and "int b;" in text
    assert "#include <uapi/linux/bpf.h>" in text  # system headers left to clang
    assert not re.search(r'#\s*include\s+"', text)
    # Line directives keep diagnostics pointing at the real file and line.
    assert '#line 1 "lib/a.h"' in text and '#line 3 "prog.c"' in text
    assert text.splitlines()[-2:] == ['#line 3 "prog.c"', "int main;"]
    (tmp_path / "bad.c").write_text('#include "lib/missing.h"\n')
    with pytest.raises(CaptureError, match=r"bad.c:1: .*lib/missing.h"):
        ebpf_programs.amalgamate(tmp_path / "bad.c", tmp_path)


def test_real_sources_amalgamate() -> None:
    for name in ebpf_programs.PROGRAMS:
        text = ebpf_programs.amalgamate(ebpf_programs.DEFAULT_SOURCE_DIR / f"{name}.c",
                                        ebpf_programs.DEFAULT_SOURCE_DIR)
        assert f"int {name}(struct __sk_buff *skb)" in text
        assert not re.search(r'#\s*include\s+"', text)


def test_compile_flags() -> None:
    flags = ebpf_programs.compile_flags(Path("/sys/fs/bpf/ambit"), Path("/src/ebpf"))
    assert "-I/src/ebpf" in flags
    assert '-DAMBIT_PIN_DIR="/sys/fs/bpf/ambit"' in flags
    for bad in ("relative/dir", '/tmp/a"b', "/tmp/a\\b", "/tmp/a\nb"):
        with pytest.raises(CaptureError, match="bpf dir"):
            ebpf_programs.compile_flags(Path(bad), Path("/src/ebpf"))
    with pytest.raises(CaptureError):
        ebpf.EbpfCapture(Path("relative"), ["eth0"])


def test_program_pins_and_loader_command() -> None:
    pin_dir = Path("/sys/fs/bpf/ambit")
    assert ebpf_programs.program_pin(pin_dir, "pod_ingress") == pin_dir / "prog_pod_ingress"
    new = ebpf_programs.program_pin_new(pin_dir, "pod_ingress")
    assert new.parent == pin_dir and "." not in new.name  # bpffs refuses names with dots
    assert not set(ebpf_maps.MAP_LAYOUTS) & {ebpf_programs.program_pin(pin_dir, n).name
                                             for n in ebpf_programs.PROGRAMS}
    argv = ebpf_programs.loader_command(pin_dir, Path("/src/ebpf"), ebpf_programs.PROGRAMS)
    assert argv[:3] == [sys.executable, "-m", "agent.capture.ebpf_loader"]
    assert argv[3:] == ["--bpf-dir", str(pin_dir), "--source-dir", "/src/ebpf",
                        "--program", "pod_ingress", "--program", "uplink_ingress"]
    assert importlib.util.find_spec(ebpf_programs.LOADER_MODULE) is not None


CLANG_OUTPUT = """\
pod_ingress.c:18:9: error: use of undeclared identifier 'oops'
        return oops + excluded.lookup(&key) != NULL;
               ^
lib/steer.h:4:1: warning: unused function 'x' [-Wunused-function]
In file included from <built-in>:2:
/virtual/include/bcc/helpers.h:3:10: fatal error: 'linux/bpf.h' file not found
2 errors generated.
"""

VERIFIER_OUTPUT = """\
bpf: Failed to load program: Permission denied
0: R1=ctx() R10=fp0
;  @ vfail.c:5
0: (61) r1 = *(u32 *)(r1 +76)         ; R1=pkt(r=0)
1: (61) r0 = *(u32 *)(r1 +0)
invalid access to packet, off=0 size=4, R1(id=0,off=0,r=0)
R1 offset is outside of the packet
processed 2 insns (limit 1000000) max_states_per_insn 0 total_states 0 peak_states 0 mark_read 0

"""


def test_compiler_messages_digest_the_loader_output() -> None:
    assert ebpf_programs.compiler_messages(CLANG_OUTPUT) == (
        "pod_ingress.c:18:9: error: use of undeclared identifier 'oops'; "
        "/virtual/include/bcc/helpers.h:3:10: fatal error: 'linux/bpf.h' file not found"
    )
    assert ebpf_programs.compiler_messages(VERIFIER_OUTPUT) == (
        "invalid access to packet, off=0 size=4, R1(id=0,off=0,r=0); "
        "R1 offset is outside of the packet"
    )
    traceback = "Traceback (most recent call last):\n  File x\nImportError: no libbcc\n"
    assert ebpf_programs.compiler_messages(traceback).endswith("ImportError: no libbcc")
    assert ebpf_programs.compiler_messages("") == ""


def _header_defaults() -> dict[str, int]:
    text = (ebpf_programs.DEFAULT_SOURCE_DIR / "lib" / "common.h").read_text()
    return {m[1]: int(m[2], 0) for m in re.finditer(r"#define (AMBIT_\w+) (0x[0-9a-f]+|\d+)", text)}


def test_c_defaults_match_python_constants() -> None:
    """The agent passes these with -D, but the defaults in the header must tell the same."""
    defaults = _header_defaults()
    passed = {
        f[2:].split("=")[0]: f.split("=", 1)[1]
        for f in ebpf_programs.compile_flags(Path("/x"), Path("/y"))
        if f.startswith("-D") and "PIN_DIR" not in f
    }
    assert {k: int(v, 0) for k, v in passed.items()} == {k: defaults[k] for k in passed}
    assert defaults["AMBIT_TPROXY_MARK"] == TPROXY_MARK
    assert defaults["AMBIT_MARK_MASK"] == MARK_MASK
    assert defaults["AMBIT_INBOUND_HBONE_PORT"] == INBOUND_HBONE_PORT
    assert defaults["AMBIT_SLOT_OUTBOUND"] == LISTENER_SLOTS[LISTENER_OUTBOUND]
    assert defaults["AMBIT_SLOT_INBOUND"] == LISTENER_SLOTS[LISTENER_INBOUND]
    assert defaults["AMBIT_SLOT_INBOUND_PLAINTEXT"] == LISTENER_SLOTS[LISTENER_INBOUND_PLAINTEXT]
    assert defaults["AMBIT_LISTENER_SLOTS"] == len(LISTENER_SLOTS)
    assert defaults["AMBIT_POD_ENROLLED"] == ebpf_maps.POD_ENROLLED
    assert ebpf_maps.MAP_LAYOUTS[ebpf_maps.MAP_LISTENERS].max_entries == len(LISTENER_SLOTS)


def test_policy_routing_defaults_are_the_iptables_ones() -> None:
    import inspect

    params = inspect.signature(policy_routing.ensure_policy_routing).parameters
    assert params["mark"].default == TPROXY_MARK
    assert params["mask"].default == MARK_MASK
    assert params["table"].default == ROUTE_TABLE
    assert params["priority"].default == RULE_PRIORITY


def test_is_bpffs_on_other_filesystems(tmp_path: Path) -> None:
    assert not bpffs.is_bpffs(tmp_path)
    assert not bpffs.is_bpffs(tmp_path / "missing")
    assert bpffs.fs_type(tmp_path / "missing") is None
    (tmp_path / "file").touch()
    with pytest.raises(CaptureError, match="not a directory"):
        bpffs.ensure_pin_dir(tmp_path / "file")
    # An existing directory that is not on bpffs is refused, never mounted over.
    with pytest.raises(CaptureError, match="not on a bpffs"):
        bpffs.ensure_pin_dir(tmp_path)
