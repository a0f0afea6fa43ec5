"""ZeroMQ socket construction with safe defaults.

In:  an endpoint string (``tcp://HOST:PORT`` or ``ipc://PATH``), bind/connect, the socket type.
Out: a configured ``zmq.Socket``.

Defaults: high-water marks small (fresh frames beat complete queues), ``linger=0`` so shutdown
never hangs, ZMTP heartbeats (1 s interval, 3 s timeout) so dead peers are noticed, fast
reconnects (100 ms … 1 s). Binding anything but loopback is refused unless
``allow_remote=True`` — and then CURVE keys are required (see :mod:`stream.security`).
"""
from __future__ import annotations

import ipaddress
import logging
import socket as pysocket
from urllib.parse import urlparse

import zmq

from nailfold.errors import NailfoldError

log = logging.getLogger(__name__)


def endpoint_host(endpoint: str) -> str | None:
    """Host part of a tcp endpoint (``None`` for ipc/inproc)."""
    if endpoint.startswith(("ipc://", "inproc://")):
        return None
    if not endpoint.startswith("tcp://"):
        raise NailfoldError(f"unsupported endpoint {endpoint!r} (use tcp://HOST:PORT or ipc://PATH)")
    u = urlparse(endpoint)
    host = u.hostname
    try:
        port = u.port
    except ValueError:
        port = None
    if not host or (port is None and not endpoint.endswith(":*")):
        raise NailfoldError(f"malformed endpoint {endpoint!r} (expected tcp://HOST:PORT)")
    return host


def is_loopback(endpoint: str) -> bool:
    host = endpoint_host(endpoint)
    if host is None:
        return True  # ipc/inproc never leave the machine
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return ipaddress.ip_address(pysocket.gethostbyname(host)).is_loopback
        except OSError:
            return False


def check_endpoint(endpoint: str, *, allow_remote: bool = False, curve: bool = False) -> None:
    """Refuse non-loopback endpoints unless explicitly allowed and CURVE-protected."""
    if is_loopback(endpoint):
        return
    if not allow_remote:
        raise NailfoldError(f"{endpoint} is not a loopback address; pass --allow-remote "
                            "(with CURVE keys from `nailfold keys`) to use the network")
    if not curve:
        raise NailfoldError(f"{endpoint} is not loopback: CURVE keys are required (--keys DIR, see `nailfold keys`)")


def make_socket(ctx: zmq.Context, kind: int, endpoint: str, *, bind: bool, hwm: int = 4,
                allow_remote: bool = False, curve_server: tuple[bytes, bytes] | None = None,
                curve_client: tuple[bytes, bytes, bytes] | None = None) -> zmq.Socket:
    """Create, configure and bind/connect a socket.

    curve_server : (public, secret) of this server — enables CURVE on a bound socket.
    curve_client : (public, secret, server_public) — enables CURVE on a connecting socket.
    """
    check_endpoint(endpoint, allow_remote=allow_remote, curve=bool(curve_server or curve_client))
    s = ctx.socket(kind)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.SNDHWM, hwm)
    s.setsockopt(zmq.RCVHWM, hwm)
    s.setsockopt(zmq.HEARTBEAT_IVL, 1000)
    s.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3000)
    s.setsockopt(zmq.RECONNECT_IVL, 100)
    s.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
    if curve_server:
        s.curve_publickey, s.curve_secretkey = curve_server
        s.curve_server = True
    if curve_client:
        s.curve_publickey, s.curve_secretkey, s.curve_serverkey = curve_client
    if kind == zmq.SUB:
        s.setsockopt(zmq.SUBSCRIBE, b"")
    try:
        if bind:
            s.bind(endpoint)
        else:
            s.connect(endpoint)
    except zmq.ZMQError as e:
        s.close(0)
        raise NailfoldError(f"cannot {'bind' if bind else 'connect'} {endpoint}: {e}") from None
    log.info("%s %s", "bound" if bind else "connected", endpoint)
    return s


def bound_endpoint(sock: zmq.Socket) -> str:
    """The concrete endpoint after binding to a wildcard port (``tcp://127.0.0.1:*``)."""
    return sock.getsockopt_string(zmq.LAST_ENDPOINT)
