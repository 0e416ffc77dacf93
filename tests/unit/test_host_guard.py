"""The session guard's comparison (tests/host_guard.py): real changes found, noise ignored."""

from __future__ import annotations

from tests.host_guard import compare

BEFORE = {
    "ip -4 rule": "0:\tfrom all lookup local\n32766:\tfrom all lookup main\n",
    "ip -6 route (all tables)": "default via fd00::1 dev eth0 proto ra metric 1024 expires "
    "1790sec pref medium\n",
    "nft list ruleset": "",
    "sysctls": "net.ipv4.ip_forward = 0\nnet.ipv4.ip_early_demux = 1\n",
}


def test_equal_snapshots_have_no_difference() -> None:
    assert compare(BEFORE, dict(BEFORE)) == []


def test_route_lifetimes_counting_down_are_not_a_change() -> None:
    later = {**BEFORE, "ip -6 route (all tables)": BEFORE["ip -6 route (all tables)"].replace(
        "1790sec", "1203sec")}  # fmt: skip
    assert compare(BEFORE, later) == []


def test_each_change_is_shown_as_a_diff_naming_its_part() -> None:
    after = {
        **BEFORE,
        "ip -4 rule": "0:\tfrom all lookup local\n32000:\tfrom all fwmark 0x1 lookup 100 proto "
        "201\n32766:\tfrom all lookup main\n",
        "nft list ruleset": "table inet tproxy_rules {\n}\n",
        "sysctls": "net.ipv4.ip_forward = 0\nnet.ipv4.ip_early_demux = 0\n",
    }
    diff = compare(BEFORE, after)
    assert "--- ip -4 rule at the start" in diff
    assert "+32000:\tfrom all fwmark 0x1 lookup 100 proto 201" in diff
    assert "+table inet tproxy_rules {" in diff
    assert "-net.ipv4.ip_early_demux = 1" in diff and "+net.ipv4.ip_early_demux = 0" in diff
    assert not any("ip -6 route" in line for line in diff)


def test_a_part_missing_on_one_side_is_a_change() -> None:
    assert compare(BEFORE, {k: v for k, v in BEFORE.items() if k != "sysctls"}) != []
