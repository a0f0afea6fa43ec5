"""Request/reply control client (dashboard → grabber / demo supervisor).

``ControlClient(endpoint).request({"cmd": "status"}, timeout=2.0)`` → reply dict, or
``{"ok": False, "error": "..."}`` when nothing answers in time. A fresh REQ socket per request
keeps the client usable after a peer restarts (a REQ socket stuck waiting for a dead peer
would otherwise block forever).
"""
from __future__ import annotations

import json

import zmq

from stream.sockets import check_endpoint


class ControlClient:
    def __init__(self, endpoint: str | None):
        self.endpoint = endpoint
        if endpoint:
            check_endpoint(endpoint)

    def request(self, req: dict, timeout: float = 2.0) -> dict:
        if not self.endpoint:
            return {"ok": False, "error": "no control endpoint configured"}
        s = zmq.Context.instance().socket(zmq.REQ)
        s.setsockopt(zmq.LINGER, 0)
        try:
            s.connect(self.endpoint)
            s.send(json.dumps(req).encode())
            if not s.poll(int(timeout * 1000)):
                return {"ok": False, "error": f"no reply from {self.endpoint} within {timeout:g} s"}
            rep = json.loads(s.recv().decode())
            return rep if isinstance(rep, dict) else {"ok": False, "error": "malformed reply"}
        except (zmq.ZMQError, ValueError) as e:
            return {"ok": False, "error": str(e)}
        finally:
            s.close(0)
