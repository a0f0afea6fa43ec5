"""Exposure: non-loopback needs CURVE; an unauthenticated peer gets nothing."""
import time

import pytest
import zmq

from nailfold.errors import NailfoldError
from stream.security import generate_keys, load_client_keys, load_server_keys
from stream.sockets import check_endpoint, make_socket


def test_loopback_ok_remote_refused():
    check_endpoint("tcp://127.0.0.1:5555")
    check_endpoint("ipc:///tmp/x")
    with pytest.raises(NailfoldError, match="loopback"):
        check_endpoint("tcp://0.0.0.0:5555")
    with pytest.raises(NailfoldError, match="CURVE"):
        check_endpoint("tcp://0.0.0.0:5555", allow_remote=True)


def test_curve_only_authorized_peer_receives(tmp_path, endpoint):
    keys = generate_keys(tmp_path / "keys")
    ctx = zmq.Context()
    try:
        pub = make_socket(ctx, zmq.PUSH, endpoint, bind=True, curve_server=load_server_keys(keys, ctx), hwm=100)
        good = make_socket(ctx, zmq.PULL, endpoint, bind=False, curve_client=load_client_keys(keys))
        # an intruder knows the server public key but holds its own unauthorized key pair
        ipub, isec = zmq.curve_keypair()
        spub, _ = load_client_keys(keys)[2], None
        bad = make_socket(ctx, zmq.PULL, endpoint, bind=False, curve_client=(ipub, isec, spub))
        plain = make_socket(ctx, zmq.PULL, endpoint, bind=False)  # no CURVE at all
        time.sleep(0.5)
        for i in range(20):
            try:
                pub.send(b"secret-%d" % i, zmq.NOBLOCK)
            except zmq.Again:
                pass
            time.sleep(0.01)
        got_good = 0
        while good.poll(300):
            good.recv()
            got_good += 1
        assert got_good > 0
        assert not bad.poll(300) and not plain.poll(300)
        with pytest.raises(NailfoldError, match="exists"):
            generate_keys(keys)
    finally:
        ctx.destroy(linger=0)
