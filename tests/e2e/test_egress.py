"""Egress from real guests through the official Python SDK, into the lab's fake internet
(netlab.py), which is this `wrenn up`'s only uplink.

Every probe that must fail has a positive control: the same request from the host namespace
(or from a sandbox allowed to make it) succeeds, so a broken probe cannot pass.
"""

import pytest
from e2b import Sandbox
from e2b.sandbox.commands.command_handle import CommandExitException

import netlab

# Guest, image and network paths: the same on either database (see conftest).
pytestmark = pytest.mark.one_database


def fetch(sbx: Sandbox, url: str, *extra: str) -> str | None:
    """The body of `url` fetched inside the guest, or None when it could not be reached."""
    args = " ".join(extra)
    try:
        r = sbx.commands.run(
            f"curl -sS -k --noproxy '*' --connect-timeout 3 --max-time 5 {args} {url}",
            timeout=30,
        )
    except CommandExitException:
        return None
    return r.stdout


def tcp(sbx: Sandbox, ip: str, port: int) -> str | None:
    """The greeting of a plain TCP service, or None."""
    code = (
        "import socket,sys\n"
        f"s=socket.create_connection(('{ip}',{port}),timeout=3)\n"
        "sys.stdout.write(s.recv(100).decode())\n"
    )
    try:
        return sbx.commands.run(f"python3 -c \"{code}\"", timeout=30).stdout
    except CommandExitException:
        return None


def slot_addresses() -> list[str]:
    """The namespace-side veth addresses of the e2e instance's slots."""
    return [netlab.slot_address(i) for i in netlab.slot_indices()]


def slot_guard_sets() -> dict[str, str]:
    """The `host_addrs` set of every slot of the e2e instance, as nft lists it."""
    import subprocess

    out = {}
    for index in netlab.slot_indices():
        ip_ns = netlab.slot_namespace(index)
        r = subprocess.run(
            ["ip", "netns", "exec", ip_ns, "nft", "list", "set", "inet", "wrenn", "host_addrs"],
            capture_output=True, text=True,
        )
        if r.returncode == 0:
            out[ip_ns] = r.stdout
    return out


def sets_without(address: str) -> bool:
    sets = slot_guard_sets()
    return bool(sets) and not any(address in s for s in sets.values())


def host_sides_of_slots() -> list[str]:
    """The host's own addresses on the e2e instance's slot veths: the host side of every
    slot that exists, as far as the host has the address (a slot being made may not yet)."""
    import json
    import subprocess

    out = subprocess.run(["ip", "-j", "-4", "addr", "show"], capture_output=True, text=True,
                         check=True).stdout
    have = {a["local"] for link in json.loads(out) for a in link.get("addr_info", [])}
    return [a for a in (netlab.slot_address(i, host_side=True) for i in netlab.slot_indices())
            if a in have]


def control(url: str, resolve: str | None = None) -> str:
    got = netlab.NetLab.fetch_from_host(url, resolve)
    assert got, f"positive control failed: {url} does not answer from the host"
    return got


@pytest.fixture(scope="module")
def open_sbx(wrenn):
    sbx = Sandbox.create(timeout=600)
    yield sbx
    sbx.kill()


def test_a_default_sandbox_reaches_the_internet_by_address_and_name(open_sbx):
    assert fetch(open_sbx, f"http://{netlab.INTERNET}/") == control(f"http://{netlab.INTERNET}/")
    # Its resolver is the host's, at its gateway, forwarding to the lab's DNS server.
    r = open_sbx.commands.run("cat /etc/resolv.conf; getent hosts allowed.test", timeout=30)
    assert "nameserver 169.254.0.22" in r.stdout
    assert netlab.INTERNET in r.stdout
    body = fetch(open_sbx, "https://allowed.test/")
    assert body and "host=allowed.test" in body
    assert tcp(open_sbx, netlab.INTERNET, 8000) == f"tcp {netlab.INTERNET}\n"


def test_without_internet_access_nothing_is_reached(wrenn, open_sbx):
    sbx = Sandbox.create(timeout=300, allow_internet_access=False)
    try:
        assert fetch(sbx, f"http://{netlab.INTERNET}/") is None
        assert tcp(sbx, netlab.INTERNET, 8000) is None
        r = sbx.commands.run("getent hosts allowed.test || echo unresolved", timeout=30)
        assert "unresolved" in r.stdout
        # Control: the same requests from a sandbox with internet.
        assert fetch(open_sbx, f"http://{netlab.INTERNET}/")
        assert sbx.get_info().allow_internet_access is False
    finally:
        sbx.kill()


def test_cidr_rules_allow_and_deny_and_allow_wins(wrenn):
    deny_one = Sandbox.create(timeout=300, network={"deny_out": [f"{netlab.INTERNET2}/32"]})
    allow_one = Sandbox.create(
        timeout=300,
        network={"deny_out": ["0.0.0.0/0"], "allow_out": [netlab.INTERNET2]},
    )
    try:
        assert fetch(deny_one, f"http://{netlab.INTERNET2}/") is None
        assert fetch(deny_one, f"http://{netlab.INTERNET}/") == control(f"http://{netlab.INTERNET}/")
        assert fetch(allow_one, f"http://{netlab.INTERNET2}/") == control(
            f"http://{netlab.INTERNET2}/"
        )
        assert fetch(allow_one, f"http://{netlab.INTERNET}/") is None
        assert tcp(allow_one, netlab.INTERNET, 8000) is None
        info = allow_one.get_info()
        assert info.network and info.network.get("allow_out") == [netlab.INTERNET2]
    finally:
        deny_one.kill()
        allow_one.kill()


def test_update_network_changes_a_running_sandbox_both_ways(wrenn):
    sbx = Sandbox.create(timeout=300)
    try:
        url = f"http://{netlab.INTERNET}/"
        assert fetch(sbx, url)
        # A connection open across the update is cut by it.
        sbx.commands.run(
            "python3 -c \"import socket,time\n"
            f"s=socket.create_connection(('{netlab.INTERNET}',8000),timeout=3); s.recv(100)\n"
            "open('/tmp/connected','w').close(); time.sleep(6)\n"
            "try:\n s.sendall(b'x'*100000); s.recv(1); print('open')\n"
            "except OSError as e: print('closed', e)\" > /tmp/held 2>&1 &",
            timeout=30,
        )
        import time

        # Python starts slowly under TCG: update only once the connection is open.
        deadline = time.monotonic() + 30
        while not sbx.files.exists("/tmp/connected"):
            assert time.monotonic() < deadline, sbx.commands.run("cat /tmp/held", timeout=30).stdout
            time.sleep(0.3)
        sbx.update_network({"deny_out": [f"{netlab.INTERNET}/32"]})
        assert fetch(sbx, url) is None
        assert fetch(sbx, f"http://{netlab.INTERNET2}/")
        deadline = time.monotonic() + 30
        while not (held := sbx.commands.run("cat /tmp/held", timeout=30).stdout):
            assert time.monotonic() < deadline, "the held connection never reported"
            time.sleep(0.5)
        assert held.startswith("closed"), held
        sbx.update_network({})
        assert fetch(sbx, url) == control(url)
    finally:
        sbx.kill()


def test_bad_network_settings_are_refused_and_leave_nothing(wrenn):
    from e2b.exceptions import InvalidArgumentException, SandboxException

    before = {s.sandbox_id for s in Sandbox.list().next_items()}
    for network in (
        {"allow_out": ["not a host name"]},
        {"deny_out": ["2001:db8::/32"]},
        {"egress_proxy": {"address": "proxy.test:1080"}},
    ):
        with pytest.raises((InvalidArgumentException, SandboxException)) as e:
            Sandbox.create(timeout=60, network=network)
        assert "400" in str(e.value) or "network" in str(e.value), e.value
    after = {s.sandbox_id for s in Sandbox.list().next_items()}
    assert after == before


@pytest.mark.parametrize(
    "target",
    [
        f"http://{netlab.LAN}/",
        f"http://{netlab.METADATA}:8080/",
        f"http://{netlab.CGNAT}/",
    ],
)
def test_always_denied_whatever_the_policy(wrenn, open_sbx, target):
    url = target
    assert control(url)
    assert fetch(open_sbx, url) is None
    wide = Sandbox.create(timeout=120, network={"allow_out": ["0.0.0.0/0"]})
    try:
        assert fetch(wide, url) is None
    finally:
        wide.kill()


def greeter(addr: str, port: int):
    """A TCP service on the host that greets whoever connects."""
    import socket
    import threading

    srv = socket.create_server((addr, port))

    def serve():
        while True:
            try:
                c, _ = srv.accept()
            except OSError:
                return
            c.sendall(b"host service\n")
            c.close()

    threading.Thread(target=serve, daemon=True).start()
    return srv


def test_the_hosts_own_addresses_and_other_slots_are_unreachable(wrenn, open_sbx):
    import socket

    # A service on every host address, and on the uplink address at the control plane's and
    # PostgreSQL's port numbers (they listen on loopback: what is refused is the address, on
    # every port). Each is reachable from the host (the control) and from no guest.
    srv = greeter("0.0.0.0", 0)
    port = srv.getsockname()[1]
    extra = [greeter(netlab.HOST_IP, p) for p in (wrenn.port, 5432)]
    slot_host_sides = host_sides_of_slots()
    assert slot_host_sides, "no slot of the e2e instance"
    try:
        for addr, p in [(netlab.HOST_IP, port), (netlab.HOST_IP, wrenn.port),
                        (netlab.HOST_IP, 5432), *[(a, port) for a in slot_host_sides]]:
            with socket.create_connection((addr, p), timeout=3) as c:
                assert c.recv(100) == b"host service\n", (addr, p)
            assert tcp(open_sbx, addr, p) is None, (addr, p)
        # An address the host gets later is denied too, once the agent noticed (every 5 s).
        import subprocess
        import time

        added = "198.51.100.5"
        assert sets_without(added), "control: no slot denies it yet"
        subprocess.run(["ip", "addr", "add", f"{added}/32", "dev", netlab.HOST_IF], check=True)
        try:
            with socket.create_connection((added, port), timeout=3) as c:
                assert c.recv(100) == b"host service\n"
            time.sleep(8)
            assert tcp(open_sbx, added, port) is None
            # The uplink table's input chain refuses it anyway; that every slot's own guard
            # learned the new address shows the agent noticed.
            sets = slot_guard_sets()
            assert sets and all(added in s for s in sets.values()), sets
        finally:
            subprocess.run(["ip", "addr", "del", f"{added}/32", "dev", netlab.HOST_IF], check=False)
        # Other slots' addresses, where the host reaches their guests' envd: the host does, a
        # guest does not.
        other = Sandbox.create(timeout=120)
        try:
            reached = []
            for ip in slot_addresses():
                if netlab.NetLab.fetch_from_host(f"http://{ip}:49983/health") is not None:
                    reached.append(ip)
                    assert fetch(open_sbx, f"http://{ip}:49983/health") is None, ip
            assert len(reached) >= 2, "control: the host reaches both sandboxes' slots"
        finally:
            other.kill()
    finally:
        srv.close()
        for e in extra:
            e.close()


def test_domain_rules_decide_by_the_name_a_connection_carries(wrenn):
    """allowed.test and denied.test share one address: only the name (DNS, SNI, Host) tells
    them apart."""
    sbx = Sandbox.create(
        timeout=300,
        network={"deny_out": ["0.0.0.0/0"], "allow_out": ["allowed.test"]},
    )
    try:
        for scheme in ("http", "https"):
            body = fetch(sbx, f"{scheme}://allowed.test/")
            assert body and "host=allowed.test" in body, (scheme, body)
            # Control: the same name and address answer from the host.
            assert control(f"{scheme}://denied.test/", f"denied.test:{80 if scheme == 'http' else 443}:{netlab.INTERNET}")
            assert fetch(sbx, f"{scheme}://denied.test/") is None, scheme
        # The resolver answers only allowed names for a locked-down sandbox.
        r = sbx.commands.run("getent hosts denied.test || echo unresolved", timeout=30)
        assert "unresolved" in r.stdout
        # An allowed name claimed for another address is not believed.
        assert fetch(sbx, "https://allowed.test/", "--resolve", f"allowed.test:443:{netlab.INTERNET2}") is None
        assert fetch(sbx, "http://allowed.test/", "--resolve", f"allowed.test:80:{netlab.INTERNET2}") is None
        # Other ports of an allowed name's address pass once the resolver gave it out.
        assert tcp(sbx, netlab.INTERNET, 8000) == f"tcp {netlab.INTERNET}\n"
        assert tcp(sbx, netlab.INTERNET2, 8000) is None
    finally:
        sbx.kill()


def test_a_lifted_lan_range_is_reachable_and_still_follows_the_policy(wrenn, open_sbx):
    """`--egress-allow-range` lifts one LAN range out of the always-denied ones, nothing more."""
    url = f"http://{netlab.LAN_SERVICE}/"
    assert fetch(open_sbx, url) == control(url)
    assert control(f"http://{netlab.LAN}/")
    assert fetch(open_sbx, f"http://{netlab.LAN}/") is None
    denied = Sandbox.create(timeout=120, network={"deny_out": [netlab.LIFTED_RANGE]})
    offline = Sandbox.create(timeout=120, allow_internet_access=False)
    try:
        assert fetch(denied, url) is None
        assert fetch(offline, url) is None
        assert fetch(denied, f"http://{netlab.INTERNET}/"), "control: the rest is open"
    finally:
        denied.kill()
        offline.kill()


def test_a_resumed_sandbox_keeps_its_latest_policy(wrenn):
    inet, inet2 = f"http://{netlab.INTERNET}/", f"http://{netlab.INTERNET2}/"
    sbx = Sandbox.create(timeout=300, network={"deny_out": [f"{netlab.INTERNET2}/32"]})
    offline = Sandbox.create(timeout=300, allow_internet_access=False)
    try:
        assert fetch(sbx, inet2) is None
        sbx.update_network({"deny_out": [f"{netlab.INTERNET}/32"]})
        assert fetch(sbx, inet) is None and fetch(sbx, inet2)
        sbx.pause()
        offline.pause()
        sbx = Sandbox.connect(sbx.sandbox_id, timeout=300)
        offline = Sandbox.connect(offline.sandbox_id, timeout=300)
        # The policy after resume is the updated one, not the one it was created with.
        assert fetch(sbx, inet) is None
        assert fetch(sbx, inet2) == control(inet2)
        assert fetch(offline, inet) is None
        # Stored normalized: a /32 is its address.
        assert sbx.get_info().network.get("deny_out") == [netlab.INTERNET]
    finally:
        sbx.kill()
        offline.kill()
