"""The generated nftables ruleset, enforced for real in network namespaces.

Three namespaces stand for the gateway, Zone 1 and Zone 3, joined by veth pairs. Addresses are
from 198.18.0.0/15 (the benchmarking range) and exist only inside these namespaces; nothing
leaves them. The gateway loads exactly what ``gateway-agent zones nft`` writes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway_agent.cli import main

pytestmark = pytest.mark.integration

GW1, Z1 = "198.18.1.1", "198.18.1.2"   # gateway <-> Zone 1
GW3, Z3 = "198.18.3.1", "198.18.3.2"   # gateway <-> Zone 3

ZONES = f"""version: 1
gateway: gw-test
zones:
  - id: 0
    networks: [198.18.0.0/24]
  - id: 1
    networks: [198.18.1.0/24]
  - id: 2
  - id: 3
    networks: [198.18.3.0/24]
interfaces:
  lo: {{zone: 2, addresses: [127.0.0.1/8]}}
  {{gw1}}: {{zone: 1, addresses: [{GW1}/24]}}
  {{gw3}}: {{zone: 3, addresses: [{GW3}/24]}}
conduits:
  - {{name: devices-mqtt, from: 1, to: 2, protocol: mqtt-tls, port: 8883}}
  - {{name: rotation-test-endpoint, from: 1, to: 2, protocol: mqtt-tls, port: 8884}}
  - {{name: firmware-images, from: 1, to: 2, protocol: https, purpose: firmware-images, port: 8470}}
  - {{name: cloud-uplink, from: 2, to: 3, protocol: mqtt-tls, port: 8883, hosts: [{Z3}], user: root}}
  - {{name: crl-fetch, from: 2, to: 3, protocol: https, port: 443}}
"""

SERVER = textwrap.dedent("""
    import socket, sys, threading
    def serve(host, port):
        s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port)); s.listen(16)
        while True:
            c, _ = s.accept(); c.sendall(b"hi"); c.close()
    for spec in sys.argv[1:]:
        host, port = spec.rsplit(":", 1)
        threading.Thread(target=serve, args=(host, int(port)), daemon=True).start()
    print("ready", flush=True)
    sys.stdin.read()
""")

CLIENT = textwrap.dedent("""
    import socket, sys
    try:
        with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1.0) as s:
            sys.exit(0 if s.recv(2) == b"hi" else 3)
    except OSError:
        sys.exit(1)
""")


def _unavailable() -> str | None:
    if sys.platform != "linux":
        return "network namespaces are Linux only"
    if os.geteuid() != 0:
        return "creating network namespaces needs root (CAP_NET_ADMIN)"
    for tool in ("ip", "nft", "setpriv"):
        if shutil.which(tool) is None:
            return f"'{tool}' is not installed (scripts/system-packages.sh installs nftables and iproute2)"
    probe = f"i12probe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, check=False)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    try:
        loaded = subprocess.run(["ip", "netns", "exec", probe, "nft", "list", "ruleset"], capture_output=True,
                                text=True, check=False)
        if loaded.returncode != 0:
            return f"nftables does not work in a namespace here: {loaded.stderr.strip()}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], check=False)
    return None


_REASON = _unavailable()
skip_without_netns = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")


def _sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, text=True)


class Lab:
    def __init__(self) -> None:
        tag = f"{os.getpid() % 100000}"
        self.gw, self.z1, self.z3 = f"i12gw{tag}", f"i12z1{tag}", f"i12z3{tag}"
        self.gw1, self.gw3 = f"g1{tag}", f"g3{tag}"  # interface names in the gateway (<= 15 chars)
        self.servers: list[subprocess.Popen[str]] = []

    def up(self) -> None:
        for ns in (self.gw, self.z1, self.z3):
            _sh("ip", "netns", "add", ns)
            _sh("ip", "-n", ns, "link", "set", "lo", "up")
        for gw_if, peer_ns, gw_addr, peer_addr in ((self.gw1, self.z1, GW1, Z1), (self.gw3, self.z3, GW3, Z3)):
            _sh("ip", "-n", self.gw, "link", "add", gw_if, "type", "veth", "peer", "name", "eth0", "netns", peer_ns)
            _sh("ip", "-n", self.gw, "addr", "add", f"{gw_addr}/24", "dev", gw_if)
            _sh("ip", "-n", self.gw, "link", "set", gw_if, "up")
            _sh("ip", "-n", peer_ns, "addr", "add", f"{peer_addr}/24", "dev", "eth0")
            _sh("ip", "-n", peer_ns, "link", "set", "eth0", "up")

    def serve(self, ns: str, *specs: str) -> None:
        proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", SERVER, *specs],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        self.servers.append(proc)

    def reaches(self, ns: str, host: str, port: int, *, as_nobody: bool = False) -> bool:
        argv = ["ip", "netns", "exec", ns]
        if as_nobody:  # another local user: the system python, which that user can read
            argv += ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", "/usr/bin/python3"]
        else:
            argv.append(sys.executable)
        done = subprocess.run([*argv, "-c", CLIENT, host, str(port)], capture_output=True, check=False, timeout=20)
        return done.returncode == 0

    def down(self) -> None:
        for proc in self.servers:
            proc.kill()
            proc.wait(5)
            for pipe in (proc.stdin, proc.stdout):
                if pipe is not None:
                    pipe.close()
        for ns in (self.gw, self.z1, self.z3):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


@pytest.fixture
def lab() -> Iterator[Lab]:
    lab = Lab()
    try:
        lab.up()
        lab.serve(lab.gw, f"{GW1}:8883", f"{GW1}:8884", f"{GW1}:8470", f"{GW1}:2222", f"{GW3}:8883",
                  f"{GW3}:8470", f"{GW3}:2222")
        lab.serve(lab.z1, f"{Z1}:2222", f"{Z1}:8883", f"{Z1}:8470")
        lab.serve(lab.z3, f"{Z3}:8883", f"{Z3}:443", f"{Z3}:2222")
        time.sleep(0.1)
        yield lab
    finally:
        lab.down()


def _matrix(lab: Lab) -> dict[str, bool]:
    return {
        "z1 -> gw:8883": lab.reaches(lab.z1, GW1, 8883),
        "z1 -> gw:8884": lab.reaches(lab.z1, GW1, 8884),
        "z1 -> gw:8470": lab.reaches(lab.z1, GW1, 8470),
        "z1 -> gw:2222": lab.reaches(lab.z1, GW1, 2222),
        "z3 -> gw:8883": lab.reaches(lab.z3, GW3, 8883),
        "z3 -> gw:8470": lab.reaches(lab.z3, GW3, 8470),
        "z3 -> gw:2222": lab.reaches(lab.z3, GW3, 2222),
        "gw -> z3:8883": lab.reaches(lab.gw, Z3, 8883),
        "gw -> z3:443": lab.reaches(lab.gw, Z3, 443),
        "gw -> z3:2222": lab.reaches(lab.gw, Z3, 2222),
        "gw -> z1:2222": lab.reaches(lab.gw, Z1, 2222),
        "gw -> z1:8883": lab.reaches(lab.gw, Z1, 8883),
        "gw -> z1:8470": lab.reaches(lab.gw, Z1, 8470),
        "gw as nobody -> z3:8883": lab.reaches(lab.gw, Z3, 8883, as_nobody=True),
        "gw as nobody -> z3:443": lab.reaches(lab.gw, Z3, 443, as_nobody=True),
    }


@skip_without_netns
def test_ruleset_enforces_exactly_the_conduits(lab: Lab, tmp_path: Path) -> None:
    # without the ruleset everything connects: the checks below can fail
    assert all(_matrix(lab).values()), _matrix(lab)

    zones = tmp_path / "zones.yaml"
    zones.write_text(ZONES.replace("{gw1}", lab.gw1).replace("{gw3}", lab.gw3))
    rules = tmp_path / "zones.nft"
    assert main(["zones", "nft", "--zones", str(zones), "-o", str(rules)]) == 0
    _sh("ip", "netns", "exec", lab.gw, "nft", "-f", str(rules))

    assert _matrix(lab) == {
        "z1 -> gw:8883": True,    # Zone 1 reaches the broker port,
        "z1 -> gw:8884": True,    # the rotation test endpoint,
        "z1 -> gw:8470": True,    # the firmware image server (its declared HTTPS conduit) ...
        "z1 -> gw:2222": False,   # ... and nothing else
        "z3 -> gw:8883": False,   # nothing in from Zone 3, not even the broker port
        "z3 -> gw:8470": False,   # nor the image port
        "z3 -> gw:2222": False,
        "gw -> z3:8883": True,    # the uplink, outbound
        "gw -> z3:443": True,     # CRL fetch, outbound
        "gw -> z3:2222": False,   # no other way out
        "gw -> z1:2222": False,   # the DMZ does not reach into the control zone
        "gw -> z1:8883": False,
        "gw -> z1:8470": False,   # the image conduit is inbound only
        "gw as nobody -> z3:8883": False,  # the uplink conduit is bound to its user (here root)
        "gw as nobody -> z3:443": True,    # the CRL conduit is not bound to a user
    }

    # loading again replaces the table atomically (no duplicate rules, no error)
    _sh("ip", "netns", "exec", lab.gw, "nft", "-f", str(rules))
    listed = subprocess.run(["ip", "netns", "exec", lab.gw, "nft", "list", "table", "inet", "edge_zones"],
                            capture_output=True, text=True, check=True).stdout
    assert listed.count("tcp dport 8883") == 2


@skip_without_netns
def test_dual_stack_ruleset_is_accepted_by_nft(tmp_path: Path) -> None:
    """IPv6 interfaces, Zone 0 in both families, a user-bound conduit: what nft itself accepts."""
    zones = tmp_path / "zones.yaml"
    zones.write_text("""version: 1
gateway: gw-6
zones:
  - {id: 0, networks: [198.18.0.0/24, "2001:db8:0::/64"]}
  - {id: 1, networks: [198.18.1.0/24, "2001:db8:1::/64"]}
  - {id: 2}
  - {id: 3, networks: [198.18.3.0/24, "2001:db8:3::/64"]}
interfaces:
  lo: {zone: 2, addresses: [127.0.0.1/8, "::1/128"]}
  eth0: {zone: 1, addresses: [198.18.1.1/24, "2001:db8:1::1/64"]}
  eth1: {zone: 3, addresses: [198.18.3.1/24, "2001:db8:3::1/64"]}
conduits:
  - {name: devices-mqtt, from: 1, to: 2, protocol: mqtt-tls, port: 8883}
  - {name: cloud-uplink, from: 2, to: 3, protocol: mqtt-tls, port: 8883, hosts: ["2001:db8:3::20"], user: 0}
  - {name: crl-fetch, from: 2, to: 3, protocol: https, port: 443}
""")
    rules = tmp_path / "zones.nft"
    assert main(["zones", "nft", "--zones", str(zones), "-o", str(rules)]) == 0
    text = rules.read_text()
    assert 'iifname "eth0" ip6 saddr { 2001:db8:1::/64 } ip6 daddr { 2001:db8:1::1 } tcp dport 8883' in text
    assert "ip6 daddr { 2001:db8:3::20 } meta skuid 0 tcp dport 8883" in text
    assert "nd-neighbor-solicit" in text
    probe = f"i12nft{os.getpid() % 100000}"
    _sh("ip", "netns", "add", probe)
    try:
        _sh("ip", "netns", "exec", probe, "nft", "-f", str(rules))
        listed = subprocess.run(["ip", "netns", "exec", probe, "nft", "list", "chain", "inet", "edge_zones", "output"],
                                capture_output=True, text=True, check=True).stdout
        assert "policy drop" in listed and "2001:db8:3::20" in listed
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True, check=False)
