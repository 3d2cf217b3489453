"""What the admin routes may be pointed at, and when the server may listen unauthenticated.

The admin routes take addresses and paths from the caller: `/v1/weights/receive` makes the
server's workers connect to the rendezvous a `TransportSpec` names, and
`/v1/update_weights_from_disk` reads the folder a body names. Without limits, whoever reaches
the routes chooses where the workers connect and which files the server opens. This module is
the policy, as pure functions (no FastAPI, and Ray only when this process already runs it), so
`serve` can apply it before anything is built and tests can check it on its own:

- `unauthenticated_exposure`: listening beyond loopback without an admin token is refused
  unless the operator says so explicitly;
- `check_transport_spec`: every host a spec names must resolve only to allowed addresses
  (loopback, the nodes of this server's Ray cluster, and what the operator lists);
- `resolve_under_roots` (from `weights_from_disk`, which applies it): a weight folder must resolve
  (symlinks and `..` followed) under a configured root; the same refusal whether it exists or not.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import socket
import sys
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

from pydantic import BaseModel

from model_engine_server.errors import Forbidden
from model_engine_server.weights_from_disk import resolve_under_roots

if TYPE_CHECKING:
    from model_engine_server.config import HttpConfig

logger = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

LOOPBACK_NAMES = frozenset({"localhost", "localhost.", "ip6-localhost", "ip6-loopback"})
LOOPBACK_NETWORKS = ("127.0.0.0/8", "::1/128")
TOKEN_SETTING = "model_engine_server.http.auth_token"
OVERRIDE_SETTING = "model_engine_server.http.allow_unauthenticated_remote"
OVERRIDE_FLAG = "--allow-unauthenticated-remote"
ENDPOINTS_SETTING = "model_engine_server.transport.allowed_endpoints"
HOST_FIELD = re.compile(r"(^|_)(addr|address|host)$")  # spec fields that name a host to connect to


# ---------------------------------------------------------------- addresses
def _as_ip(host: str) -> IPAddress | None:
    """The address a literal names (`[::1]`, `fe80::1%eth0` accepted), IPv4-mapped IPv6 as IPv4."""
    try:
        ip = ipaddress.ip_address(host.strip().strip("[]").split("%")[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or localhost -- by the literal alone, without asking DNS."""
    name = host.strip().lower()
    if name in LOOPBACK_NAMES:
        return True
    ip = _as_ip(name)
    return ip is not None and ip.is_loopback


def resolve_host(host: str) -> list[IPAddress]:
    """Every address `host` stands for (a literal, or a name through getaddrinfo); [] when a
    name does not resolve, which the callers treat as refused."""
    ip = _as_ip(host)
    if ip is not None:
        return [ip]
    try:
        infos = socket.getaddrinfo(host, None)
    except (OSError, UnicodeError):
        return []
    found = {_as_ip(str(info[4][0])) for info in infos}
    return sorted((ip for ip in found if ip is not None), key=str)


def _networks(allowed: Iterable[str]) -> list[IPNetwork]:
    """Allowed entries as networks: a CIDR or address as written, a name as its addresses now."""
    networks: list[IPNetwork] = []
    for entry in allowed:
        entry = entry.strip()
        if not entry:
            continue
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
            continue
        except ValueError:
            pass
        networks.extend(ipaddress.ip_network(ip) for ip in resolve_host(entry))
    return networks


def endpoint_allowed(host: str, allowed: Iterable[str]) -> bool:
    """True when `host` resolves and EVERY address it resolves to lies in an allowed network
    (a name with one allowed and one foreign address could be used to reach the foreign one)."""
    if not host or not host.strip():
        return False
    addresses = resolve_host(host)
    if not addresses:
        return False
    networks = _networks(allowed)
    return all(any(ip.version == net.version and ip in net for net in networks) for ip in addresses)


def ray_node_addresses() -> list[str]:
    """The addresses of the alive nodes of the Ray cluster this process is connected to, or []
    when it is not. Ray is never imported (nor started) here: a process that never imported it
    cannot be connected."""
    ray: Any = sys.modules.get("ray")
    if ray is None:
        return []
    try:
        if not ray.is_initialized():
            return []
        nodes = ray.nodes()
    except Exception as error:  # a cluster going away must not turn into a 500
        logger.warning("could not list the Ray cluster's nodes for the transport allow-list: %s", error)
        return []
    return sorted({str(n["NodeManagerAddress"]) for n in nodes if n.get("Alive") and n.get("NodeManagerAddress")})


def default_allowed_endpoints(extra: Sequence[str] = ()) -> list[str]:
    """Loopback, this server's Ray cluster's nodes (where a verl trainer's workers run), plus
    what the operator lists; computed per request, as nodes join and leave."""
    return [*LOOPBACK_NETWORKS, *ray_node_addresses(), *extra]


def spec_hosts(spec: Any) -> list[tuple[str, str]]:
    """(field, host) of every field of a transport spec that names a host to connect to."""
    values = spec.model_dump() if isinstance(spec, BaseModel) else dict(spec)
    return [(name, str(value)) for name, value in values.items() if HOST_FIELD.search(name) and value is not None]


def check_transport_spec(spec: Any, allowed: Iterable[str]) -> None:
    """Raise `Forbidden` naming the host and the setting when a spec names a host outside
    `allowed`; the workers must not be told to join it."""
    allowed = list(allowed)
    for field, host in spec_hosts(spec):
        if not endpoint_allowed(host, allowed):
            raise Forbidden(
                f"transport spec {field}={host!r} is not an endpoint this server joins (allowed: loopback, the "
                f"nodes of the server's Ray cluster, and {ENDPOINTS_SETTING}); add the host or its network "
                f"to {ENDPOINTS_SETTING} to allow it"
            )


def transport_spec_guard(extra: Sequence[str] = ()) -> Callable[[Any], None]:
    """The check `/v1/weights/receive` runs on every spec (set on `app.state` by `create_app`):
    the default endpoints, recomputed per call, plus the operator's `extra`."""
    listed = tuple(extra)

    def guard(spec: Any) -> None:
        check_transport_spec(spec, default_allowed_endpoints(listed))

    return guard


# ---------------------------------------------------------------- weight folders
# ---------------------------------------------------------------- listening
def unauthenticated_exposure(http: "HttpConfig", environ: dict[str, str] | None = None) -> str | None:
    """Why listening as `http` says would expose the admin routes to anyone, or None when it
    would not (a loopback host, or an admin token set)."""
    if is_loopback(http.host) or http.token(environ) is not None:
        return None
    return (
        f"listening on {http.host!r} (not loopback) with no admin token: anyone who reaches it could pause "
        f"the server, load weights or point its workers at a host of their choice"
    )


def exposure_remedy(http: "HttpConfig") -> str:
    """How to start anyway: the token settings, or the explicit override."""
    env = f"the environment variable {http.auth_token_env} or " if http.auth_token_env else ""
    return f"set {env}{TOKEN_SETTING}, or pass {OVERRIDE_FLAG} ({OVERRIDE_SETTING}=true) to serve without one"


__all__ = [
    "check_transport_spec",
    "default_allowed_endpoints",
    "endpoint_allowed",
    "exposure_remedy",
    "is_loopback",
    "ray_node_addresses",
    "resolve_under_roots",
    "transport_spec_guard",
    "unauthenticated_exposure",
]
