"""The policy of the `tproxy-policy` mode: 50 rules, the last of them on names, so that every
connection of the benchmark is sniffed (issue 10's acceptance).

The first `ADDRESS_RULES` rules match on destinations in 198.19.0.0/16 (prefix lengths /16 to
/32) that the benchmark's traffic never goes to, some of them also on ports: a third on lists
that include the web server's port 80 (so the engine's port partition cannot skip them for the
connection-rate test), a third on ports the benchmark never uses, a third on no ports at all.
Their actions mix `reset` and `redirect` (to IP literals in 198.18.x, never reached). The last
`NAME_RULES` rules reset `*.blocked-N.example` by `sni` or `sni_or_host`, on every address: the
benchmark's connections match their (absent) address keys, so each one waits for the client's
first bytes (wrk's request head, iperf3's cookie) before anything connects upstream, and, its
name matching none of them, is allowed by the default.

With `capture=True` (the `tproxy-policy-capture` mode, issue 11) every `redirect` rule also says
`capture = true`: captures are configured, and no benchmark connection is captured.
"""

from __future__ import annotations

RULES = 50
NAME_RULES = 5
ADDRESS_RULES = RULES - NAME_RULES

# Ports no benchmark connection goes to (the benchmark uses 80, 5201 and 9000).
_UNUSED_PORTS: tuple[list[int | str], ...] = (
    [22, 25],
    [3306, "5432"],
    ["8000-8099"],
    [8443, 9443],
    ["10000-10100", 1194],
)
# Lists that include the web server's port, so port 80 alone does not rule them out.
_WITH_PORT_80: tuple[list[int | str], ...] = (
    [80, 443],
    ["79-81"],
    [80, 8080, 8443],
    ["1-1024"],
    [443, 80, 853],
)


def _address_rule(i: int, capture: bool) -> list[str]:
    prefix = 16 + i % 17  # /16 to /32
    third, fourth = (i * 37) % 256, (i * 11) % 256
    network = f"198.19.{third}.{fourth if prefix > 24 else 0}/{prefix}"
    if prefix <= 16:
        network = "198.19.0.0/16"
    lines = ["[[rule]]", f'name = "addr-{i:02d}"', f'dst = ["{network}", "198.19.255.{i}/32"]']
    kind = i % 3
    if kind == 0:
        lines.append(f"ports = {_toml_list(_WITH_PORT_80[i // 3 % len(_WITH_PORT_80)])}")
    elif kind == 1:
        lines.append(f"ports = {_toml_list(_UNUSED_PORTS[i // 3 % len(_UNUSED_PORTS)])}")
    if i % 2:
        lines += ['action = "redirect"', f'to = "198.18.{200 + i % 50}.{1 + i}:{1024 + i}"']
        if capture:
            lines.append("capture = true")
    else:
        lines.append('action = "reset"')
    return lines


def _toml_list(items: list[int | str]) -> str:
    return "[" + ", ".join(f'"{v}"' if isinstance(v, str) else str(v) for v in items) + "]"


def _name_rule(n: int) -> list[str]:
    key = "sni" if n % 2 else "sni_or_host"
    return [
        "[[rule]]",
        f'name = "names-{n}"',
        f'{key} = ["*.blocked-{n}.example", "blocked-{n}.example"]',
        'action = "reset"',
    ]


def render_policy(capture: bool = False) -> str:
    """The policy file's TOML text; with `capture`, its redirect rules capture (see above)."""
    lines = ['default = "allow"', "sniff_timeout_s = 1.0", ""]
    for i in range(ADDRESS_RULES):
        lines += [*_address_rule(i, capture), ""]
    for n in range(1, NAME_RULES + 1):
        lines += [*_name_rule(n), ""]
    return "\n".join(lines)
