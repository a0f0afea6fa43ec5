"""CURVE keys for ZeroMQ endpoints that leave the machine.

``nailfold keys DIR`` writes, with pyzmq's ``zmq.auth.create_certificates``::

    DIR/server.key_secret, DIR/server.key          # the binding side (grabber, stage publisher)
    DIR/client.key_secret, DIR/client.key          # the connecting side (stage, dashboard)
    DIR/authorized_clients/client.key              # public keys the server accepts

Secret files are created with mode 0600. A bound socket with CURVE enabled only talks to peers
that hold the server's public key AND whose own public key is in ``authorized_clients`` (a ZAP
authenticator thread checks it); anyone else gets nothing. Loopback endpoints need no keys.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from nailfold.errors import NailfoldError

log = logging.getLogger(__name__)
_AUTH: dict[int, ThreadAuthenticator] = {}


def generate_keys(folder: str | os.PathLike) -> Path:
    d = Path(folder)
    (d / "authorized_clients").mkdir(parents=True, exist_ok=True)
    for name in ("server", "client"):
        if (d / f"{name}.key_secret").exists():
            raise NailfoldError(f"{d / (name + '.key_secret')} exists; refusing to overwrite keys")
        zmq.auth.create_certificates(str(d), name)
        os.chmod(d / f"{name}.key_secret", 0o600)
    shutil.copy(d / "client.key", d / "authorized_clients" / "client.key")
    return d


def _load(path: Path) -> tuple[bytes, bytes | None]:
    if not path.exists():
        raise NailfoldError(f"key file not found: {path} (create keys with `nailfold keys DIR`)")
    try:
        return zmq.auth.load_certificate(str(path))
    except (ValueError, OSError) as e:
        raise NailfoldError(f"cannot read key file {path}: {e}") from None


def load_server_keys(folder: str | os.PathLike, ctx: zmq.Context | None = None) -> tuple[bytes, bytes]:
    """(public, secret) of the server; also starts the ZAP authenticator for this context."""
    d = Path(folder)
    pub, sec = _load(d / "server.key_secret")
    ctx = ctx or zmq.Context.instance()
    if id(ctx) not in _AUTH:
        auth = ThreadAuthenticator(ctx)
        auth.start()
        auth.configure_curve(domain="*", location=str(d / "authorized_clients"))
        _AUTH[id(ctx)] = auth
    return pub, sec


def load_client_keys(folder: str | os.PathLike) -> tuple[bytes, bytes, bytes]:
    """(public, secret, server public) for a connecting socket."""
    d = Path(folder)
    pub, sec = _load(d / "client.key_secret")
    server_pub, _ = _load(d / "server.key")
    return pub, sec, server_pub


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder", help="folder to create the key pairs in")


def run(args: argparse.Namespace) -> int:
    d = generate_keys(args.folder)
    print(f"CURVE keys written to {d}: give server.key + client.key_secret/client.key to connecting hosts; "
          f"keep server.key_secret on the binding host.")
    return 0
