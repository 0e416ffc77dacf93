"""Steered (SO_REUSEPORT + a client-address BPF program) against one shared listening socket.

`sudo .venv/bin/python -m bench.steering [--rounds 3] [--seconds 6]` builds a lab, runs
tproxy with two workers (or the CPU count) both ways in interleaved rounds (the order flips
each round) and measures, on the real TPROXY path:

* new connections/s with wrk (`Connection: close`, 32 connections) from one client address,
  and from 64 client addresses (the client namespace source-NATs each new connection to the
  next of 64 addresses, `numgen inc`), IPv4 and IPv6;
* the balance: each worker's share of the sessions (from the session log);
* for the steered variant, that the kernel honoured the program: every client address was
  served by exactly the worker `engine.steering.worker_for` names.

It prints one JSON object per measurement and a min-max summary at the end.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import tproxy.cli.main as cli
from bench.clients import CLIENTS, add_clients, snat
from tproxy.engine.steering import worker_for
from tproxy.lab.services import HTTP_PORT, start_nginx
from tproxy.lab.topology import Lab, stop_process, wait_until

VARIANTS = ("shared", "steered")


def _wrk(lab: Lab, family: int, seconds: float) -> float:
    host = lab.server.endpoint(HTTP_PORT, family)
    url = f"http://{host}/"
    argv = ["wrk", "-t1", "-c32", "-d", f"{seconds:g}s", "-H", "Connection: close", url]
    out = lab.run(lab.client, argv, timeout_s=seconds + 30, check=False).stdout.decode()
    found = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if found is None:
        raise RuntimeError(f"wrk failed: {out}")
    return float(found.group(1))


class Proxy:
    def __init__(self, lab: Lab, variant: str, workers: int) -> None:
        workdir = Path(tempfile.mkdtemp(prefix="tproxy-steering-"))
        lab.cleanup_paths.append(workdir)
        self.log = workdir / "sessions.jsonl"
        self.lab = lab
        argv = [sys.executable, "-m", "bench.steering", "proxy", variant, "--workers",
                str(workers), "--log-format", "json", "--spoof-source"]  # fmt: skip
        with self.log.open("wb") as out:
            self.proc = lab.start(lab.router, argv, stdout=out)
        wait_until(lambda: self.log.read_text().count('"event":"listening"') >= workers, 10,
                   "the workers to listen")  # fmt: skip
        self.seen = 0

    def opened_since_last(self) -> list[dict[str, Any]]:
        lines = self.log.read_text().splitlines()
        events = [json.loads(line) for line in lines[self.seen :]]
        self.seen = len(lines)
        return [e for e in events if e.get("event") == "session_open"]

    def stop(self) -> None:
        stop_process(self.proc, timeout_s=40)
        self.lab.forget(self.proc)


def _analyse(opened: list[dict[str, Any]], workers: int, steered: bool) -> dict[str, Any]:
    per_worker = Counter(e["worker"] for e in opened)
    shares = [per_worker.get(w, 0) / max(1, len(opened)) for w in range(1, workers + 1)]
    by_client: dict[str, set[int]] = defaultdict(set)
    for e in opened:
        by_client[_host(e["client"])].add(e["worker"])
    result: dict[str, Any] = {
        "sessions": len(opened),
        "shares": [round(s, 3) for s in shares],
        "addresses": len(by_client),
        "clients_on_one_worker": sum(1 for ws in by_client.values() if len(ws) == 1),
    }
    if steered:
        result["as_predicted"] = all(
            ws == {worker_for(ipaddress.ip_address(c), workers)} for c, ws in by_client.items()
        )
    return result


def _host(client: str) -> str:
    """The address of a logged `ip:port` or `[ip]:port`."""
    return client.rsplit(":", 1)[0].strip("[]")


def _load() -> str:
    """The 1, 5 and 15 minute load averages."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def measure(rounds: int, seconds: float) -> list[dict[str, Any]]:
    workers = os.cpu_count() or 1
    results: list[dict[str, Any]] = []
    with Lab() as lab:
        for host in (lab.client, lab.router):
            lab.sysctl(host, "net.ipv4.ip_local_port_range", "1024 65000")
        lab.sysctl(lab.client, "net.ipv4.tcp_tw_reuse", "1")
        lab.sysctl(lab.router, "net.ipv4.ip_early_demux", "0")
        start_nginx(lab, lab.server, HTTP_PORT)
        add_clients(lab)
        lab.run(lab.router, [sys.executable, "-m", "tproxy", "rules", "apply", "--ports",
                             str(HTTP_PORT)])  # fmt: skip
        for round_no in range(1, rounds + 1):
            order = VARIANTS if round_no % 2 else tuple(reversed(VARIANTS))
            for variant in order:
                proxy = Proxy(lab, variant, workers)
                try:
                    for clients in (1, CLIENTS):
                        snat(lab, clients > 1)
                        for family in (4, 6):
                            load = _load()
                            rate = _wrk(lab, family, seconds)
                            row = {"round": round_no, "variant": variant, "clients": clients,
                                   "family": family, "conn_per_s": round(rate), "load": load,
                                   **_analyse(proxy.opened_since_last(), workers,
                                              variant == "steered")}  # fmt: skip
                            print(json.dumps(row), flush=True)
                            results.append(row)
                            time.sleep(1)
                finally:
                    snat(lab, False)
                    proxy.stop()
    return results


def summarise(results: list[dict[str, Any]]) -> None:
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = defaultdict(list)
    for row in results:
        groups[(row["variant"], row["clients"], row["family"])].append(row)
    print("variant  clients  family  conn/s (min-max)  busiest worker's share (min-max)")
    for (variant, clients, family), rows in sorted(groups.items()):
        rates = [r["conn_per_s"] for r in rows]
        busiest = [max(r["shares"]) for r in rows]
        print(f"{variant:8} {clients:7} {family:7}  {min(rates)}-{max(rates):<12} "
              f"{min(busiest):.2f}-{max(busiest):.2f}")  # fmt: skip
    # The fair comparison: steered over shared within one round (the two ran back to back).
    print("clients  family  steered/shared conn/s per round (min-max)")
    for clients in (1, CLIENTS):
        for family in (4, 6):
            by_round: dict[int, dict[str, float]] = defaultdict(dict)
            for row in results:
                if row["clients"] == clients and row["family"] == family:
                    by_round[row["round"]][row["variant"]] = row["conn_per_s"]
            ratios = [r["steered"] / r["shared"] for r in by_round.values() if len(r) == 2]
            if ratios:
                print(f"{clients:7} {family:7}  {min(ratios):.2f}-{max(ratios):.2f}")


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "proxy":
        cli.STEER_BY_CLIENT = sys.argv[2] == "steered"
        return cli.main(["run", *sys.argv[3:]])
    parser = argparse.ArgumentParser(prog="python -m bench.steering")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=6)
    parser.add_argument("--summarise", metavar="FILE", help="only summarise a former run's output")
    args = parser.parse_args()
    if args.summarise:
        lines = Path(args.summarise).read_text().splitlines()
        summarise([json.loads(line) for line in lines if line.startswith("{")])
        return 0
    summarise(measure(args.rounds, args.seconds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
