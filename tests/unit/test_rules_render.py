from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tproxy.rules.apply import _nft_error_text
from tproxy.rules.model import PortRange, RulesError, RulesSpec, WhenDown, parse_ports
from tproxy.rules.render import (
    parse_restore_comment,
    render_ip_route_replace,
    render_ip_rule_add,
    render_nft_apply,
    render_restore_comment,
)

GOLDEN = Path(__file__).parent / "golden"


def test_parse_ports_sorts_and_merges() -> None:
    assert parse_ports("443, 80,81,8000-8100,8050-8200") == (
        PortRange(80, 81),
        PortRange(443, 443),
        PortRange(8000, 8200),
    )


@pytest.mark.parametrize("text", ["", "80,", "0", "65536", "90-80", "http", "1-2-3"])
def test_parse_ports_rejects(text: str) -> None:
    with pytest.raises(RulesError):
        parse_ports(text)


@given(st.lists(st.integers(1, 65535), min_size=1, max_size=30))
def test_parse_ports_covers_exactly_the_ports_given(ports: list[int]) -> None:
    ranges = parse_ports(",".join(map(str, ports)))
    covered = {p for r in ranges for p in range(r.first, r.last + 1)}
    assert covered == set(ports)
    assert all(a.last + 1 < b.first for a, b in itertools.pairwise(ranges))


def test_marks_must_differ() -> None:
    with pytest.raises(RulesError, match="must differ"):
        RulesSpec(ports=parse_ports("80"), divert_mark=1, proxy_mark=1)


def test_reserved_route_table_is_refused() -> None:
    with pytest.raises(RulesError, match="reserved"):
        RulesSpec(ports=parse_ports("80"), route_table=254)


@pytest.mark.parametrize("when_down", list(WhenDown))
def test_nft_script_matches_golden(when_down: WhenDown) -> None:
    spec = RulesSpec(ports=parse_ports("80,443,8000-8100"), when_down=when_down)
    script = render_nft_apply(spec, {"net.ipv4.ip_early_demux": "1"})
    assert script == (GOLDEN / f"nft-apply-{when_down.value}.nft").read_text()


def test_ruleset_keeps_syns_off_the_socket_shortcut() -> None:
    script = render_nft_apply(RulesSpec(ports=parse_ports("80")), {})
    shortcut = next(line for line in script.splitlines() if "socket transparent" in line)
    assert "tcp flags & (syn | ack) != syn" in shortcut
    # The proxy's own traffic is exempt before anything else can divert it.
    chain = script[script.index("chain prerouting") :].splitlines()
    assert chain[2].strip() == "meta mark 0x00000002 return"


def test_ip_commands_cover_both_families() -> None:
    spec = RulesSpec(ports=parse_ports("80"), route_table=123, rule_priority=999, divert_mark=5)
    rules = [" ".join(c.argv) for c in render_ip_rule_add(spec)]
    routes = [" ".join(c.argv) for c in render_ip_route_replace(spec)]
    assert rules == [
        "ip -4 rule add fwmark 0x5 lookup 123 pref 999 protocol 201",
        "ip -6 rule add fwmark 0x5 lookup 123 pref 999 protocol 201",
    ]
    assert routes == [
        "ip -4 route replace local 0.0.0.0/0 dev lo table 123 proto 201",
        "ip -6 route replace local ::/0 dev lo table 123 proto 201",
    ]
    v4_only = RulesSpec(ports=parse_ports("80"), ipv6=False)
    assert [c.family for c in render_ip_rule_add(v4_only)] == [4]


def test_restore_comment_round_trip() -> None:
    previous = {"net.ipv4.ip_early_demux": "1"}
    assert parse_restore_comment(render_restore_comment(previous)) == previous
    assert parse_restore_comment(render_restore_comment({})) == {}
    # Nothing but known sysctls with numeric values is ever written back.
    assert parse_restore_comment("tproxy restore: kernel.panic=1 net.ipv4.ip_early_demux=x") == {}


def test_nft_errors_become_one_sentence() -> None:
    stderr = (
        "/dev/stdin:9:60-80: Error: Could not process rule: No such file or directory\n"
        "meta l4proto tcp tcp dport @divert_ports tproxy to :1800\n"
    )
    assert "no nftables tproxy support" in _nft_error_text(stderr)
    assert _nft_error_text("Error: syntax error, unexpected junk\n") == (
        "nft rejected the ruleset: syntax error, unexpected junk"
    )
