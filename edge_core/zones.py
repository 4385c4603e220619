"""IEC 62443 zones and conduits of the gateway: the model, the compliance check, the nftables ruleset.

Plain core: it reads YAML text (already loaded by the caller) and returns data; no sockets, no
subprocesses. ``gateway-agent zones check`` and ``zones nft`` are the thin CLI around it.

The model (``configs/zones.yaml``, docs/zones.md): the gateway sits in Zone 2 (operations DMZ).
Each interface faces one zone; each conduit is a (from zone, to zone, protocol, port) that may be
*initiated* in that direction. What the seed's zone model allows, and so what the check enforces:

- Zone 1 -> Zone 2: MQTT over TLS into the gateway (devices; the rotation test endpoint), and
  HTTPS into the gateway only on a conduit declared ``purpose: firmware-images`` (devices fetch
  signed firmware images from the release publisher's image server);
- Zone 2 -> Zone 3: MQTT over TLS or HTTPS out (the uplink, CRL fetches);
- nothing initiated from Zone 3 inward, nothing from Zone 2 into Zone 1, nothing to or from Zone 0,
  and no plaintext protocol on any conduit.

``check`` returns every ``Violation`` (code, file, line, message) it finds, in file order; an empty
list means compliant. ``render_nftables`` writes a ruleset that admits exactly the conduits.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from edge_core import yamlsrc
from edge_core.binds import is_loopback, split_bind
from edge_core.errors import ConfigError

__all__ = [
    "PROTOCOLS",
    "Conduit",
    "Interface",
    "Violation",
    "Zone",
    "ZoneModel",
    "check_agent",
    "check_broker",
    "check_firmware",
    "check_model",
    "check_uplink",
    "load_yaml",
    "parse_zones",
    "render_nftables",
]

#: conduit protocols and their transport; every one is TLS
PROTOCOLS = {"mqtt-tls": "tcp", "https": "tcp"}
PLAINTEXT = frozenset({"mqtt", "http", "modbus", "opc-ua", "telnet", "ftp"})
_INTO_DMZ = frozenset({"mqtt-tls"})
#: the one named exception to _INTO_DMZ: devices fetch firmware images over HTTPS (TLS 1.3, mTLS)
FIRMWARE_IMAGES = "firmware-images"
#: conduit purposes: (from zone, to zone, protocol) each one is allowed for
PURPOSES = {FIRMWARE_IMAGES: (1, 2, "https")}
_OUT_OF_DMZ = frozenset({"mqtt-tls", "https"})
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address
IfAddress = ipaddress.IPv4Interface | ipaddress.IPv6Interface


@dataclass(frozen=True)
class Violation:
    code: str
    source: str
    line: int | None
    message: str

    def __str__(self) -> str:
        where = f"{self.source}:{self.line}" if self.line is not None else self.source
        return f"{where}: {self.message} [{self.code}]"


@dataclass(frozen=True)
class Zone:
    level: int
    name: str
    networks: tuple[Network, ...]
    line: int | None


@dataclass(frozen=True)
class Interface:
    name: str
    zone: int
    addresses: tuple[IfAddress, ...]
    line: int | None


@dataclass(frozen=True)
class Conduit:
    name: str
    source_zone: int
    target_zone: int
    protocol: str
    port: int
    hosts: tuple[str, ...]
    line: int | None
    #: outbound only: the local user (or uid) whose processes may use this conduit; None = any process
    user: str | None = None
    #: a named exception to the zone rules (``PURPOSES``), e.g. ``firmware-images``; None = none
    purpose: str | None = None

    @property
    def inbound(self) -> bool:
        """Initiated from outside toward the gateway."""
        return self.target_zone == 2 and self.source_zone != 2

    def host_addresses(self) -> list[Address]:
        out = []
        for host in self.hosts:
            try:
                out.append(ipaddress.ip_address(host))
            except ValueError:
                continue
        return out


@dataclass(frozen=True)
class ZoneModel:
    gateway: str
    zones: dict[int, Zone]
    interfaces: tuple[Interface, ...]
    conduits: tuple[Conduit, ...]
    source: str

    def zone_of_address(self, address: Address) -> Interface | None:
        """The gateway interface that holds ``address``, if any."""
        for iface in self.interfaces:
            if any(address == a.ip for a in iface.addresses):
                return iface
        return None

    def zone_of_network(self, address: Address) -> int | None:
        """The zone whose declared networks contain ``address`` (most specific wins)."""
        best: tuple[int, int] | None = None
        for zone in self.zones.values():
            for net in zone.networks:
                if address.version == net.version and address in net and (best is None or net.prefixlen > best[1]):
                    best = (zone.level, net.prefixlen)
        return best[0] if best else None

    def interfaces_facing(self, level: int) -> list[Interface]:
        return [i for i in self.interfaces if i.zone == level]


# --------------------------------------------------------------------------- parsing


def _int_zone(sec: yamlsrc.Section, key: str) -> int:
    value = sec.take(key, int, required=True)
    if not 0 <= value <= 4:
        raise sec.error(key, f"{sec.what}.{key}: zone {value} is not 0 .. 4")
    return value


def _user(sec: yamlsrc.Section) -> str | None:
    value = sec.take("user", object, None)
    if value is None:
        return None
    text = str(value)
    if not (text.isdigit() or (text.replace("-", "").replace("_", "").isalnum() and text[0].isalpha())):
        raise sec.error("user", f"{sec.what}.user: {text!r} is not a user name or uid")
    return text


def parse_zones(text: bytes, *, source: str) -> ZoneModel:
    """Read ``zones.yaml`` into a model; malformed files raise ``ConfigError`` (file, line)."""
    doc = yamlsrc.load(text, source=source)
    top = yamlsrc.Section(doc, source=source, what="zones")
    version = top.take("version", int, required=True)
    if version != 1:
        raise top.error("version", f"zones: version {version} is not supported (only 1)")
    gateway = top.take("gateway", str, required=True)
    zones: dict[int, Zone] = {}
    raw_zones = top.take("zones", list, required=True)
    for index, item in enumerate(raw_zones):
        line = raw_zones.item_lines[index] if hasattr(raw_zones, "item_lines") else None
        sec = yamlsrc.Section(item, source=source, line=line, what=f"zones[{index}]")
        level = _int_zone(sec, "id")
        if level in zones:
            raise sec.error("id", f"zones[{index}]: zone {level} is declared twice (first at line {zones[level].line})")
        nets: list[Network] = []
        for value in sec.take("networks", list, []):
            try:
                nets.append(ipaddress.ip_network(str(value), strict=True))
            except ValueError as exc:
                raise sec.error("networks", f"zones[{index}].networks: {exc}") from exc
        zones[level] = Zone(level, sec.take("name", str, f"zone {level}"), tuple(nets), sec.line)
        sec.done()
    if 2 not in zones:
        raise top.error("zones", "zones: Zone 2 (the DMZ the gateway sits in) must be declared")

    interfaces: list[Interface] = []
    isec = top.sub("interfaces", required=True)
    assert isec is not None
    for name, body, line in isec.items():
        sec = yamlsrc.Section(body, source=source, line=line, what=f"interfaces.{name}")
        level = _int_zone(sec, "zone")
        addrs: list[IfAddress] = []
        for value in sec.take("addresses", list, required=True):
            try:
                addrs.append(ipaddress.ip_interface(str(value)))
            except ValueError as exc:
                raise sec.error("addresses", f"interfaces.{name}.addresses: {exc}") from exc
        sec.done()
        if level not in zones:
            raise sec.error("zone", f"interfaces.{name}: zone {level} is not declared under 'zones'")
        interfaces.append(Interface(name, level, tuple(addrs), line))

    conduits: list[Conduit] = []
    raw = top.take("conduits", list, [])
    for index, item in enumerate(raw):
        line = raw.item_lines[index] if hasattr(raw, "item_lines") else None
        sec = yamlsrc.Section(item, source=source, line=line, what=f"conduits[{index}]")
        port = sec.take("port", int, required=True)
        if not 1 <= port <= 65535:
            raise sec.error("port", f"conduits[{index}].port must be 1 .. 65535, not {port}")
        conduit = Conduit(name=sec.take("name", str, f"conduit-{index}"), source_zone=_int_zone(sec, "from"),
                          target_zone=_int_zone(sec, "to"), protocol=sec.take("protocol", str, required=True),
                          port=port, hosts=tuple(str(h) for h in sec.take("hosts", list, [])), line=line,
                          user=_user(sec), purpose=sec.take("purpose", str, None))
        sec.done()
        if conduit.purpose is not None:
            allowed = PURPOSES.get(conduit.purpose)
            if allowed is None:
                raise sec.error("purpose", f"conduits[{index}].purpose: {conduit.purpose!r} is not one of "
                                           f"{', '.join(sorted(PURPOSES))}")
            if (conduit.source_zone, conduit.target_zone, conduit.protocol) != allowed:
                raise sec.error("purpose", f"conduits[{index}].purpose: a {conduit.purpose} conduit is from: "
                                           f"{allowed[0]}, to: {allowed[1]}, protocol: {allowed[2]}")
        if conduit.user is not None and conduit.source_zone != 2:
            raise sec.error("user", f"conduits[{index}].user: only an outbound conduit (from: 2) can be bound to "
                                    "the local user that opens it")
        conduits.append(conduit)
    top.done()
    return ZoneModel(gateway=gateway, zones=zones, interfaces=tuple(interfaces), conduits=tuple(conduits),
                     source=source)


# --------------------------------------------------------------------------- the zone file itself


def check_model(model: ZoneModel) -> list[Violation]:
    """What the zone file itself declares against the zone model of the seed."""
    out: list[Violation] = []
    src = model.source

    def add(code: str, line: int | None, message: str) -> None:
        out.append(Violation(code, src, line, message))

    for iface in model.interfaces:
        if iface.zone == 0:
            add("zone0_interface", iface.line, f"interface {iface.name} faces Zone 0; the safety layer must have "
                                               "no network path at all, so the gateway has no interface there")
        zone = model.zones[iface.zone]
        for addr in iface.addresses:
            if zone.networks and not any(addr.ip in net for net in zone.networks if net.version == addr.version):
                add("address_outside_zone", iface.line, f"interface {iface.name} address {addr} is not inside "
                                                        f"Zone {iface.zone}'s networks")
            other = model.zone_of_network(addr.ip)
            if other is not None and other != iface.zone and not addr.ip.is_loopback:
                add("address_in_other_zone", iface.line, f"interface {iface.name} address {addr} lies in a "
                                                         f"network of Zone {other}, but the interface faces "
                                                         f"Zone {iface.zone}")
    low = [(z.level, n) for z in model.zones.values() if z.level <= 1 for n in z.networks]
    for i, (la, na) in enumerate(low):
        for lb, nb in low[i + 1:]:
            if la != lb and na.version == nb.version and na.overlaps(nb):
                add("overlapping_zones", model.zones[lb].line,
                    f"Zone {la} network {na} overlaps Zone {lb} network {nb}")
    for c in model.conduits:
        label = f"conduit {c.name} (Zone {c.source_zone} -> Zone {c.target_zone}, {c.protocol}/{c.port})"
        if c.protocol in PLAINTEXT or c.protocol not in PROTOCOLS:
            why = "is plaintext" if c.protocol in PLAINTEXT else "is not a known TLS protocol"
            add("plaintext_conduit", c.line, f"{label}: protocol '{c.protocol}' {why}; use one of "
                                             f"{', '.join(sorted(PROTOCOLS))}")
        if 0 in (c.source_zone, c.target_zone):
            add("zone0_conduit", c.line, f"{label}: nothing may reach or leave Zone 0 (physical isolation)")
        elif c.source_zone >= 3 and c.target_zone <= 2:
            add("inbound_from_zone3", c.line, f"{label}: Zone {c.source_zone} may never initiate a connection "
                                              "into the DMZ or below; the gateway connects out instead")
        elif c.source_zone == 2 and c.target_zone == 1:
            add("into_control_zone", c.line, f"{label}: the DMZ must not initiate connections into the control "
                                             "zone; devices connect to the gateway")
        elif 2 not in (c.source_zone, c.target_zone):
            add("not_via_gateway", c.line, f"{label}: the gateway only carries conduits of its own zone; a "
                                           "conduit skipping Zone 2 cannot be enforced here")
        elif c.source_zone == 1 and c.protocol in PROTOCOLS and c.protocol not in _INTO_DMZ \
                and c.purpose is None:
            add("wrong_protocol", c.line, f"{label}: Zone 1 reaches the gateway over mqtt-tls only (and over "
                                          f"https only on a conduit declared 'purpose: {FIRMWARE_IMAGES}')")
        elif c.source_zone == 2 and c.target_zone == 3 and c.protocol in PROTOCOLS and c.protocol not in _OUT_OF_DMZ:
            add("wrong_protocol", c.line, f"{label}: Zone 2 reaches Zone 3 over mqtt-tls or https only")
        if c.source_zone != 2 and c.target_zone == 2 and c.source_zone not in (0, 3, 4) \
                and not model.interfaces_facing(c.source_zone):
            add("no_interface", c.line, f"{label}: no interface faces Zone {c.source_zone}")
        if c.source_zone == 2 and c.target_zone in (3, 4) and not model.interfaces_facing(c.target_zone):
            add("no_interface", c.line, f"{label}: no interface faces Zone {c.target_zone}")
        for host in c.host_addresses():
            host_zone = model.zone_of_network(host)
            if c.source_zone == 2 and host_zone is not None and host_zone != c.target_zone:
                add("host_in_wrong_zone", c.line, f"{label}: host {host} lies in Zone {host_zone}")
    return out


# --------------------------------------------------------------------------- the other config files


def _line(node: Any, key: str) -> int | None:
    lines: dict[str, int] = getattr(node, "key_lines", {})
    return lines.get(key, getattr(node, "line", None))


def _get(node: Any, *path: str) -> tuple[Any, int | None]:
    """A nested value and the line of its key; (None, line of the deepest parent) when absent."""
    line = getattr(node, "line", None)
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None, line
        line = _line(node, key)
        node = node[key]
    return node, line


def _split_url(url: str) -> tuple[str, str, int | None]:
    """Scheme, host and port of ``scheme://[user@]host[:port]/...`` (the core parses no URLs beyond this)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return "", "", None
    authority = rest.split("/", 1)[0].split("?", 1)[0].rsplit("@", 1)[-1]
    if authority.startswith("["):
        host, _, tail = authority[1:].partition("]")
        port_text = tail[1:] if tail.startswith(":") else ""
    else:
        host, _, port_text = authority.partition(":")
    return scheme.lower(), host.lower(), int(port_text) if port_text.isdigit() else None


class _Checker:
    def __init__(self, model: ZoneModel, source: str) -> None:
        self.model = model
        self.source = source
        self.out: list[Violation] = []

    def add(self, code: str, line: int | None, message: str) -> None:
        self.out.append(Violation(code, self.source, line, message))

    def loopback_only(self, value: Any, line: int | None, what: str) -> None:
        if not isinstance(value, str):
            return
        host, _ = split_bind(value)
        if not is_loopback(host):
            self.add("not_loopback", line, f"{what} {value} must be on loopback; it serves this gateway only")

    def listener(self, value: Any, line: int | None, what: str, *, protocol: str = "mqtt-tls",
                 purpose: str | None = None, code: str = "listener_without_conduit") -> None:
        """A listener devices reach: loopback, or an address on an interface with an inbound conduit."""
        if not isinstance(value, str):
            return
        host, port = split_bind(value)
        if host in ("", "0.0.0.0", "::", "*"):  # noqa: S104 - we are detecting wildcard binds
            if self.model.interfaces_facing(3) or self.model.interfaces_facing(4):
                self.add("wildcard_listener", line, f"{what} binds {value}: every address, so also the Zone 3 "
                                                    "interface; bind the Zone 1 address instead")
            return
        if is_loopback(host):
            return
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            self.add("unknown_address", line, f"{what} binds host name {host!r}; bind an address of an interface "
                                              "in configs/zones.yaml")
            return
        iface = self.model.zone_of_address(address)
        if iface is None:
            self.add("unknown_address", line, f"{what} binds {address}, which no interface in "
                                              f"{self.model.source} holds")
            return
        if iface.zone >= 3:
            self.add("listener_on_zone3", line, f"{what} listens on {address} ({iface.name}, Zone {iface.zone}): "
                                                "nothing may listen toward Zone 3")
            return
        if iface.zone == 0:
            self.add("zone0_conduit", line, f"{what} listens on {address} ({iface.name}), an interface in Zone 0")
            return
        if iface.zone == 2:
            return
        if not self.inbound_conduit(iface.zone, port, protocol, purpose):
            kind = f"{protocol} conduit" + (f" with purpose {purpose}" if purpose else "")
            self.add(code, line, f"{what} listens on {address}:{port} ({iface.name}, Zone {iface.zone}) but no "
                                 f"{kind} from Zone {iface.zone} to Zone 2 allows port {port}")

    def inbound_conduit(self, zone: int, port: int | None, protocol: str, purpose: str | None) -> bool:
        return any(c.source_zone == zone and c.target_zone == 2 and c.port == port and c.protocol == protocol
                   and c.purpose == purpose for c in self.model.conduits)

    def image_url(self, host: str, port: int, line: int | None) -> None:
        """Where devices are told to fetch images: a Zone 1 address (or name) a firmware-images conduit covers."""
        what = f"publish.http.public_url {host}:{port}"
        try:
            address: Address | None = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            address = None
        if address is not None and address.is_loopback:
            return  # this gateway's own devices under test: no conduit is crossed
        zones = [1] if address is None else []
        if address is not None:
            iface = self.model.zone_of_address(address)
            zones = [iface.zone] if iface is not None else []
        if not any(self.inbound_conduit(zone, port, "https", FIRMWARE_IMAGES) for zone in zones):
            self.add("image_url_without_conduit", line, f"{what}: devices in Zone 1 reach no image server there; "
                                                        f"no https conduit with purpose {FIRMWARE_IMAGES} from "
                                                        f"Zone 1 to an address of this gateway allows port {port}")

    def outbound(self, host: str, port: int, protocol: str, line: int | None, what: str, code: str) -> None:
        """A destination the gateway dials: must match a Zone 2 -> Zone 3 conduit of ``protocol``."""
        try:
            address: Address | None = ipaddress.ip_address(host)
        except ValueError:
            address = None
        if address is not None and not address.is_loopback:
            zone = self.model.zone_of_network(address)
            on_gateway = self.model.zone_of_address(address)
            if on_gateway is not None or (zone is not None and zone <= 2):
                where = f"the gateway's own {on_gateway.name}" if on_gateway else f"Zone {zone}"
                self.add("not_outbound", line, f"{what} {host}:{port} is in {where}, not in Zone 3: it must be "
                                               "reached outbound over a Zone 2 -> Zone 3 conduit")
                return
        if address is not None and address.is_loopback:
            return  # a local relay or a test cloud on this machine: no conduit is crossed
        for c in self.model.conduits:
            if (c.source_zone == 2 and c.target_zone == 3 and c.protocol == protocol and c.port == port
                    and (not c.hosts or host in c.hosts)):
                return
        self.add(code, line, f"{what} {host}:{port} ({protocol}) matches no outbound Zone 2 -> Zone 3 conduit "
                             f"in {self.model.source}")


def check_broker(model: ZoneModel, doc: Any, *, source: str) -> list[Violation]:
    """``broker.yaml``: listeners only toward Zone 1 conduits or loopback, no plaintext, status on loopback."""
    chk = _Checker(model, source)
    for section in ("listener", "cert_test_listener"):
        value, line = _get(doc, section, "bind")
        chk.listener(value, line, f"{section}.bind")
    plain, line = _get(doc, "unsafe_plaintext_listener")
    if plain is not None:
        chk.add("plaintext_listener", line, "unsafe_plaintext_listener is configured: no plaintext MQTT on a zone "
                                            "gateway, not even on loopback; remove it")
    value, line = _get(doc, "status", "bind")
    chk.loopback_only(value, line, "status.bind")
    return chk.out


def check_agent(model: ZoneModel, doc: Any, *, source: str) -> list[Violation]:
    """``agent.yaml``: CRL sources reached outbound over HTTPS conduits, broker and status on loopback."""
    chk = _Checker(model, source)
    sources, line = _get(doc, "crl", "sources")
    if isinstance(sources, list):
        lines = getattr(sources, "item_lines", [line] * len(sources))
        for index, item in enumerate(sources):
            url = item.get("url") if isinstance(item, dict) else None
            if not isinstance(url, str):
                continue  # a file source crosses no conduit
            scheme, hostname, url_port = _split_url(url)
            item_line = _line(item, "url") or lines[index]
            if scheme != "https":
                chk.add("plaintext_fetch", item_line, f"crl.sources[{index}] {url} is not HTTPS; a CRL is signed, "
                                                      "but a plaintext conduit is still one")
                continue
            chk.outbound(hostname, url_port or 443, "https", item_line, f"crl.sources[{index}]",
                         "crl_source_without_conduit")
    host, line = _get(doc, "broker", "host")
    if isinstance(host, str) and not is_loopback(host):
        chk.add("not_loopback", line, f"broker.host {host} must be loopback: the agent talks to this gateway's "
                                      "broker only")
    value, line = _get(doc, "status", "bind")
    chk.loopback_only(value, line, "status.bind")
    return chk.out


def check_firmware(model: ZoneModel, doc: Any, *, source: str) -> list[Violation]:
    """``firmware.yaml``: the image server over HTTPS only, reachable from Zone 1 only over a declared
    ``firmware-images`` conduit (or on loopback), never toward Zone 3."""
    chk = _Checker(model, source)
    url, url_line = _get(doc, "publish", "http", "public_url")
    if isinstance(url, str):
        scheme, host, url_port = _split_url(url)
        if scheme != "https":
            chk.add("plaintext_image_url", url_line, f"publish.http.public_url {url} is not HTTPS: devices fetch "
                                                     "firmware images over TLS only")
        else:
            chk.image_url(host, url_port or 443, url_line)
    value, line = _get(doc, "publish", "http", "bind")
    chk.listener(value, line, "publish.http.bind", protocol="https", purpose=FIRMWARE_IMAGES,
                 code="image_server_without_conduit")
    host, line = _get(doc, "publish", "broker", "host")
    if isinstance(host, str) and not is_loopback(host):
        chk.add("not_loopback", line, f"publish.broker.host {host} must be loopback: the release publisher talks "
                                      "to this gateway's broker only")
    return chk.out


def check_uplink(model: ZoneModel, doc: Any, *, source: str) -> list[Violation]:
    """``uplink.yaml``: the cloud over an outbound mqtt-tls conduit, the local broker and status on loopback."""
    chk = _Checker(model, source)
    host, line = _get(doc, "cloud", "host")
    port, _ = _get(doc, "cloud", "port")
    if isinstance(host, str):
        chk.outbound(host, port if isinstance(port, int) else 8883, "mqtt-tls", line, "cloud", "uplink_without_conduit")
    local, line = _get(doc, "local", "host")
    if isinstance(local, str) and not is_loopback(local):
        chk.add("not_loopback", line, f"local.host {local} must be loopback: the uplink subscribes on this "
                                      "gateway's broker only")
    value, line = _get(doc, "status", "bind")
    chk.loopback_only(value, line, "status.bind")
    return chk.out


# --------------------------------------------------------------------------- nftables


def _set(addresses: Iterable[Any]) -> str:
    return "{ " + ", ".join(str(a) for a in addresses) + " }"


def _family(values: Iterable[Any], version: int) -> list[Any]:
    return [v for v in values if v.version == version]


def render_nftables(model: ZoneModel, *, table: str = "edge_zones", log: bool = True) -> str:
    """An nftables ruleset (for ``nft -f``) that admits exactly the model's conduits and drops the rest.

    Loading it replaces only its own table, atomically. Input, output and forward chains drop by
    default; established and related traffic of an allowed connection passes; new connections pass
    only as a conduit allows: inbound on the interface facing the source zone to the gateway's own
    address there, outbound on the interface facing the target zone (to the conduit's host
    addresses when it names any). The gateway routes nothing between zones.
    """
    lines = [
        "#!/usr/sbin/nft -f",
        f"# generated by `gateway-agent zones nft` from {model.source} (gateway {model.gateway}); do not edit:",
        "# change the zone file and generate again. Loading replaces this table only, atomically.",
        f"table inet {table}",
        f"delete table inet {table}",
        f"table inet {table} {{",
    ]
    zone0 = model.zones.get(0)
    z0 = list(zone0.networks) if zone0 else []
    v4_zero, v6_zero = _family(z0, 4), _family(z0, 6)
    has_v6 = any(a.version == 6 and not a.ip.is_loopback for i in model.interfaces for a in i.addresses)
    drop_log = ' log prefix "edge-zones drop in: " level info' if log else ""
    out_log = ' log prefix "edge-zones drop out: " level info' if log else ""

    def common(direction: str) -> list[str]:
        iface = "iif" if direction == "in" else "oif"
        rules = [f'    {iface} "lo" accept', "    ct state invalid drop", "    ct state established,related accept"]
        addr = "saddr" if direction == "in" else "daddr"
        if v4_zero:
            rules.append(f'    ip {addr} {_set(v4_zero)} counter drop comment "Zone 0: no network path"')
        if v6_zero:
            rules.append(f'    ip6 {addr} {_set(v6_zero)} counter drop comment "Zone 0: no network path"')
        if has_v6:
            rules.append("    icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert, nd-router-solicit, "
                         'nd-router-advert } accept comment "IPv6 neighbour discovery"')
        return rules

    lines += ["  chain input {", "    type filter hook input priority filter; policy drop;", *common("in")]
    for c in model.conduits:
        if not (c.target_zone == 2 and c.source_zone in (1,)):
            continue  # only Zone 1 -> Zone 2 conduits open anything inbound (check_model refuses the rest)
        for iface in model.interfaces_facing(c.source_zone):
            sources = model.zones[c.source_zone].networks
            for version, ip in ((4, "ip"), (6, "ip6")):
                mine = [a.ip for a in _family(iface.addresses, version)]
                if not mine:
                    continue
                src = _family(sources, version)
                match = f" {ip} saddr {_set(src)}" if src else ""
                lines.append(f'    iifname "{iface.name}"{match} {ip} daddr {_set(mine)} tcp dport {c.port} '
                             f'ct state new accept comment "{c.name}: Zone {c.source_zone} -> 2 {c.protocol}"')
    if log:
        lines.append(f"    limit rate 10/second burst 20 packets{drop_log}")
    lines += ["  }", "  chain output {", "    type filter hook output priority filter; policy drop;",
              *common("out")]
    for c in model.conduits:
        if not (c.source_zone == 2 and c.target_zone == 3 and c.protocol in _OUT_OF_DMZ):
            continue
        # nftables matches addresses: a conduit's IP hosts restrict it; with none, Zone 3's networks do;
        # host names only serve `zones check` (list the addresses they resolve to as well)
        hosts: list[Any] = c.host_addresses() or list(model.zones[c.target_zone].networks)
        for iface in model.interfaces_facing(c.target_zone):
            for version, ip in ((4, "ip"), (6, "ip6")):
                if not _family(iface.addresses, version):
                    continue
                dst = _family(hosts, version)
                if hosts and not dst:
                    continue
                match = f" {ip} daddr {_set(dst)}" if dst else ""
                if c.user is not None:  # only that user's processes (the uplink daemon) may open it
                    match += f" meta skuid {c.user}" if c.user.isdigit() else f' meta skuid "{c.user}"'
                lines.append(f'    oifname "{iface.name}" meta nfproto {"ipv4" if version == 4 else "ipv6"}'
                             f'{match} tcp dport {c.port} ct state new accept '
                             f'comment "{c.name}: Zone 2 -> {c.target_zone} {c.protocol}"')
    if log:
        lines.append(f"    limit rate 10/second burst 20 packets{out_log}")
    lines += ["  }", "  chain forward {", "    type filter hook forward priority filter; policy drop;",
              "  }", "}", ""]
    return "\n".join(lines)


def load_yaml(text: bytes, *, source: str) -> Any:
    """Parse one of the other config files for the check (its own loader validates the rest)."""
    doc = yamlsrc.load(text, source=source)
    if not isinstance(doc, dict):
        raise ConfigError("must be a mapping at the top level", source=source, line=getattr(doc, "line", None))
    return doc
