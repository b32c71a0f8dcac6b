"""A hostile filter in Python, for the tests: by the recipient's address it loops
forever (loop@), allocates until memory runs out (bomb@), or connects (net@, to the
letter's params.connect) and reports what happened as its skip reason."""

import json
import socket

from componentize_py_types import Ok
from wit_world import WitWorld as Policy
from wit_world.imports.types import Decision_Send, Decision_Skip

target = ["127.0.0.1", 9]


def attempt():
    host, port = target
    try:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.connect((host, int(port)))
        return "CONNECTED"
    except Exception as e:
        return f"connect refused: {e!r}"


class WitWorld(Policy):
    def validate(self, letter):
        return None

    def prepare(self, letter):
        connect = json.loads(letter.params).get("connect")
        if connect:
            target[:] = connect.rsplit(":", 1)

    def filter(self, recipients):
        out = []
        for r in recipients:
            if r.email.startswith("loop@"):
                while True:
                    pass
            if r.email.startswith("bomb@"):
                hoard = []
                while True:
                    hoard.append(bytearray(1 << 20))
            if r.email.startswith("net@"):
                out.append(Ok(Decision_Skip(attempt())))
                continue
            out.append(Ok(Decision_Send()))
        return out
