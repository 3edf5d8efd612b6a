"""Run inside a sandbox: speak the wire protocol by hand and report every byte received.

Usage: python sandbox_probe.py OP:JSON_PAYLOAD ... (the socket is $CREDPROXY_SOCKET).
Prints one JSON object: the replies and the hex of every byte the daemon sent.
Standard library only, like any inner client.
"""

import json
import os
import socket
import sys


def main() -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(os.environ["CREDPROXY_SOCKET"])
    received = bytearray()

    def exchange(obj: dict) -> dict:
        body = json.dumps(obj).encode()
        sock.sendall(len(body).to_bytes(4, "big") + body)
        head = recv_exact(4)
        return json.loads(recv_exact(int.from_bytes(head, "big")))

    def recv_exact(n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = sock.recv(n - len(out))
            if not chunk:
                raise SystemExit("connection closed")
            out += chunk
        received.extend(out)
        return out

    replies = [exchange({"v": 1, "op": "handshake", "payload": {"minVersion": 1, "maxVersion": 2}})]
    for i, arg in enumerate(sys.argv[1:]):
        op, _, payload = arg.partition(":")
        replies.append(
            exchange({"v": 2, "id": str(i), "op": op, "payload": json.loads(payload or "{}")})
        )
    sock.close()
    print(json.dumps({"replies": replies, "received_hex": received.hex()}))


main()
