"""The systemd units (`tproxy service-unit`): the rules in a oneshot that stays after the proxy
stops, the proxy Type=notify with a watchdog, unprivileged with only CAP_NET_ADMIN (and
CAP_NET_BIND_SERVICE below port 1024), sandboxed, writable only where it writes; the options
are checked as the two commands check them, and rules that would not reach the proxy are
refused; `systemd-analyze verify` accepts what is printed; the files in contrib/systemd/ are
these units."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tproxy.cli.main import main
from tproxy.service.units import PROXY_UNIT, RULES_UNIT, UnitOptions, quote, render_units

CONTRIB = Path(__file__).resolve().parents[2] / "contrib" / "systemd"
# What contrib/systemd/ holds: the units for a typical router, tproxy installed in /usr/local.
CONTRIB_OPTIONS = UnitOptions(
    command=("/usr/local/bin/tproxy",),
    rules_args=("--ports", "80,443"),
    run_args=("--spoof-source", "--config", "/etc/tproxy/tproxy.toml"),
)


def _lines(text: str) -> set[str]:
    return {line for line in text.splitlines() if line and not line.startswith("#")}


def test_the_rules_stay_when_the_proxy_stops_and_the_proxy_notifies() -> None:
    units = render_units(CONTRIB_OPTIONS)
    rules, proxy = _lines(units[RULES_UNIT]), _lines(units[PROXY_UNIT])
    assert {"Type=oneshot", "RemainAfterExit=yes",
            "ExecStart=/usr/local/bin/tproxy rules apply --ports 80,443",
            "ExecStop=/usr/local/bin/tproxy rules remove"} <= rules  # fmt: skip
    assert {"Type=notify", "NotifyAccess=main", "WatchdogSec=30",
            "ExecReload=/usr/local/bin/tproxy reload",
            f"Wants={RULES_UNIT} network-online.target",
            "User=tproxy", "AmbientCapabilities=CAP_NET_ADMIN",
            "CapabilityBoundingSet=CAP_NET_ADMIN", "NoNewPrivileges=yes",
            "ProtectSystem=strict"} <= proxy  # fmt: skip
    # Not bound to the rules: stopping or restarting the proxy leaves them.
    assert not any(line.startswith(("BindsTo=", "PartOf=", "Requires=")) for line in proxy)


def test_a_listener_below_1024_gets_cap_net_bind_service_and_written_paths_are_writable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keylog = tmp_path / "keys" / "keys.log"
    assert main(["service-unit", "--rules", "--ports 443 --proxy-port 443", "--",
                 "--listen", "0.0.0.0:443", "--capture-dir", "/var/lib/tproxy/captures",
                 "--ca", "/etc/tproxy/ca", "--keylog", str(keylog)]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "AmbientCapabilities=CAP_NET_ADMIN CAP_NET_BIND_SERVICE" in printed
    assert "ReadWritePaths=/var/lib/tproxy/captures" in printed
    assert f"ReadWritePaths={keylog.parent}" in printed


def test_reload_asks_the_control_socket_the_proxy_makes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`systemctl reload` runs `tproxy reload`, which must find the socket the proxy made: the
    default one, the one `--control` names, or the one the `--config` file names (read at
    reload time: the file may gain `control` later). Only under /run/tproxy, the unit's
    RuntimeDirectory= (another directory under /run would be gone after a reboot)."""
    tproxy = (sys.executable, "-m", "tproxy")

    def exec_reload(*run_args: str) -> str:
        assert main(["service-unit", "--rules", "--ports 80", "--", *run_args]) == 0
        printed = capsys.readouterr().out.splitlines()
        [line] = [x for x in printed if x.startswith("ExecReload=") and " reload" in x]
        return line

    assert exec_reload() == "ExecReload=" + " ".join((*tproxy, "reload"))
    assert exec_reload("--control", "/run/tproxy/edge.sock") == "ExecReload=" + " ".join(
        (*tproxy, "reload", "--control", "/run/tproxy/edge.sock")
    )
    config = tmp_path / "tproxy.toml"
    config.write_text('control = "/run/tproxy/edge.sock"\n')
    assert exec_reload("--config", str(config)) == "ExecReload=" + " ".join(
        (*tproxy, "reload", "--config", str(config))
    )
    for control in ("/run/edge/control.sock", "/run/tproxy.sock"):
        assert main(["service-unit", "--rules", "--ports 80", "--", "--control", control]) == 1
        assert "under systemd the control socket goes in /run/tproxy/" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("rules", "run", "why"),
    [
        ("--ports 80", ["--listen", "0.0.0.0:1900"], "the rules divert to port 1800"),
        ("--ports 80 --mode redirect", [], "the rules are in redirect mode"),
        ("--ports 80 --mark 0x5", [], "the rules exempt mark 0x5"),
    ],
)
def test_rules_that_would_not_reach_the_proxy_are_refused(
    rules: str, run: list[str], why: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["service-unit", "--rules", rules, "--", *run]) == 1
    assert why in capsys.readouterr().err


def test_a_bad_option_is_refused_as_the_command_would_refuse_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["service-unit", "--rules", "--ports eighty"])
    assert exit_.value.code == 2
    assert "--ports" in capsys.readouterr().err


def test_written_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    assert main(["service-unit", "--rules", "--ports 80,443", "--write", str(tmp_path),
                 "--", "--spoof-source"]) == 0  # fmt: skip
    files = [str(tmp_path / RULES_UNIT), str(tmp_path / PROXY_UNIT)]
    done = subprocess.run(["systemd-analyze", "verify", *files], capture_output=True,
                          text=True, check=False)  # fmt: skip
    assert (done.returncode, done.stderr) == (0, ""), done.stderr


def test_the_units_in_contrib_are_what_service_unit_makes() -> None:
    for name, text in render_units(CONTRIB_OPTIONS).items():
        assert (CONTRIB / name).read_text() == text, f"regenerate contrib/systemd/{name}"


def test_systemd_stops_the_supervisor_only_and_nftables_takes_the_rules_along() -> None:
    """KillMode=mixed: under systemd's default (control-group) every worker gets SIGTERM from
    systemd and again from the supervisor, and a second one cuts every session at once
    (tests/integration/test_service.py stops the proxy as the unit says). nftables.service
    flushes the whole ruleset when it stops, restarts or reloads: the rules go and come back
    with it."""
    units = render_units(CONTRIB_OPTIONS)
    rules, proxy = _lines(units[RULES_UNIT]), _lines(units[PROXY_UNIT])
    assert {"KillMode=mixed", "KillSignal=SIGTERM"} <= proxy
    assert {"PartOf=nftables.service", "ReloadPropagatedFrom=nftables.service",
            "After=network-pre.target nftables.service",
            "ExecReload=/usr/local/bin/tproxy rules apply --ports 80,443"} <= rules  # fmt: skip


@pytest.mark.parametrize(
    ("arg", "item"),
    [
        ("--spoof-source", "--spoof-source"),
        ("/etc/tproxy/$site.toml", "/etc/tproxy/$$site.toml"),  # systemd expands $site
        ("/srv/my keys/k.log", '"/srv/my keys/k.log"'),
        ("it's", '"it\'s"'),  # a quote only around a whole item: not shlex's 'it'"'"'s'
        ("a\\b", '"a\\\\b"'),  # C escapes work inside quotes too
        ('say "hi"', '"say \\"hi\\""'),
        ("100%", "100%%"),
        (";", "\\;"),
        ("", '""'),
    ],
)
def test_command_line_items_are_quoted_as_systemd_reads_them(arg: str, item: str) -> None:
    assert quote(arg) == item


def test_a_control_character_cannot_be_put_in_a_unit(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match="control character"):
        quote("a\nExecStartPre=/bin/sh")
    assert main(["service-unit", "--rules", "--ports 80", "--", "--ca", "/etc/tproxy/ca",
                 "--keylog", "/var/log/a\nb/k.log"]) == 1  # fmt: skip
    assert "a control character cannot be put in a unit file" in capsys.readouterr().err


def test_awkward_arguments_pass_systemd_analyze_verify_without_a_warning(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    folder = tmp_path / "my keys\\x $HOME %n"
    folder.mkdir()
    keylog = str(folder / "k's.log")
    assert main(["service-unit", "--rules", "--ports=80,443", "--write", str(tmp_path),
                 "--", "--keylog", keylog, "--ca", "/etc/tproxy/ca"]) == 0  # fmt: skip
    proxy = (tmp_path / PROXY_UNIT).read_text()
    assert f'--keylog "{tmp_path}/my keys\\\\x $$HOME %%n/k\'s.log"' in proxy
    assert f'ReadWritePaths="{tmp_path}/my keys\\\\x $HOME %%n"' in proxy
    done = subprocess.run(["systemd-analyze", "verify", str(tmp_path / PROXY_UNIT)],
                          capture_output=True, text=True, check=False)  # fmt: skip
    assert (done.returncode, done.stderr) == (0, ""), done.stderr


def test_relative_paths_are_refused_as_systemd_runs_the_proxy_in_root(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["service-unit", "--rules", "--ports 80", "--", "--ca", "ca"]) == 1
    assert "give absolute paths (systemd runs the proxy in /): ca" in capsys.readouterr().err


def test_a_writable_path_that_does_not_exist_is_named_and_homes_stay_readable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "captures"
    assert main(["service-unit", "--rules", "--ports 80", "--", "--capture-dir",
                 str(missing)]) == 0  # fmt: skip
    err = capsys.readouterr().err
    assert f"{missing} does not exist: systemd will not start the proxy" in err
    assert f"chown tproxy {missing}" in err
    options = UnitOptions(command=("/home/me/.venv/bin/python", "-m", "tproxy"),
                          rules_args=("--ports", "80"))  # fmt: skip
    assert "ProtectHome=read-only" in _lines(render_units(options)[PROXY_UNIT])
    assert "ProtectHome=yes" in _lines(render_units(CONTRIB_OPTIONS)[PROXY_UNIT])
