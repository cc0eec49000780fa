"""The pod table's file: a snapshot line plus a journal, so a CNI ADD or DEL appends one line
instead of rewriting every pod's record (issue 19 item 4), and a restarted agent reads back
exactly the table it had."""

from __future__ import annotations

import json
from pathlib import Path

from agent.pods import JOURNAL_MIN, LocalPod, PodTable, Tombstone


def pod(i: int) -> LocalPod:
    return LocalPod(f"ns/p{i}", (f"10.1.{i // 250}.{i % 250 + 1}",), f"veth{i}", f"/run/netns/p{i}",
                    f"c{i}", True, "ambient")


def reread(path: Path) -> PodTable:
    t = PodTable(path)
    t.load()
    return t


def test_changes_append_one_line_each_and_reload_the_same_table(tmp_path: Path) -> None:
    path = tmp_path / "pods.json"
    t = PodTable(path)
    t.put(pod(0))  # no file yet: a snapshot
    assert len(path.read_text().splitlines()) == 1
    before = path.stat().st_size
    t.put(pod(1))
    t.put(LocalPod("ns/x", pod(0).ips, "vethx"))  # reuses p0's address: replaces it
    t.bury(pod(1), 5.0, 256)
    t.remove("ns/nobody")  # nothing changed: nothing written
    t.set_deleted((Tombstone.of(pod(1), 6.0, "gone"),))
    lines = path.read_text().splitlines()
    assert [json.loads(x)["op"] for x in lines[1:]] == ["put", "put", "bury", "deleted"]
    assert all(len(x) < 400 for x in lines[1:])  # one record each, not the table
    assert path.stat().st_size > before
    again = reread(path)
    assert again.pods == t.pods == {"ns/x": LocalPod("ns/x", pod(0).ips, "vethx")}
    assert again.deleted == t.deleted == (Tombstone.of(pod(1), 6.0, "gone"),)
    again.put(pod(7))  # appending continues after a load
    assert reread(path).pods == again.pods


def test_journal_is_compacted_once_longer_than_the_table(tmp_path: Path) -> None:
    path = tmp_path / "pods.json"
    t = PodTable(path)
    longest = 0
    for i in range(300):
        t.put(pod(i))
        if i % 3 == 0:
            t.bury(pod(i), float(i), 256)
        longest = max(longest, len(path.read_text().splitlines()) - 1)
        # bounded by the table's size (amortised O(1) per change), never the change count
        assert longest <= max(JOURNAL_MIN, len(t.pods) + len(t.deleted)) + 1
    again = reread(path)
    assert again.pods == t.pods and again.deleted == t.deleted


def test_torn_last_line_is_skipped_and_old_format_loads(tmp_path: Path) -> None:
    path = tmp_path / "pods.json"
    t = PodTable(path)
    t.put(pod(1))
    t.put(pod(2))
    with path.open("a") as f:
        f.write('{"op":"put","pod":{"uid":"ns/p3"')  # killed mid-write
    assert set(reread(path).pods) == {"ns/p1", "ns/p2"}
    old = {"pods": [{"uid": "ns/a", "ips": ["10.0.0.2"], "host_iface": "v1", "netns": "",
                     "container_id": "c", "decision": True, "reason": "r"}],
           "deleted": [{"uid": "ns/b", "ips": ["10.0.0.3"], "container_id": "", "netns": "",
                        "deleted_at": 1.0, "reason": "CNI DEL"}]}
    path.write_text(json.dumps(old, indent=1))
    again = reread(path)
    assert set(again.pods) == {"ns/a"} and again.deleted[0].uid == "ns/b"


def test_a_bad_line_in_the_middle_moves_the_file_aside(tmp_path: Path) -> None:
    path = tmp_path / "pods.json"
    t = PodTable(path)
    t.put(pod(1))
    path.write_text(path.read_text() + "garbage\n" + '{"op":"remove","uid":"ns/p1"}\n')
    again = reread(path)
    assert again.pods == {} and (tmp_path / "pods.corrupt").exists()
