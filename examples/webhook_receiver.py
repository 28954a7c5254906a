#!/usr/bin/env python3
"""A sipbridge call event receiver (docs/webhooks.md), standard library only.

    EVENTS_SECRET=... python3 examples/webhook_receiver.py --cert cert.pem --key key.pem \
        [--host 127.0.0.1] [--port 8443]

Serves HTTPS, checks each POST's Sipbridge-Signature (HMAC-SHA256 of "<t>.<body>" under
the tenant's events_secret, t within 5 minutes), answers 401 to a bad one and 200 to a
good one, and prints each new event (de-duplicated by its id) as one JSON line on stdout.
Replace `handle` with what your business does with the events. The daemon's tests
(tests/webhooks.rs) run this file against a real call.
"""

import argparse
import collections
import hashlib
import hmac
import http.server
import json
import os
import ssl
import sys
import threading
import time

TOLERANCE_S = 300
MAX_BODY = 1 << 20
SEEN_MAX = 10_000


def verify(secret: bytes, header: str, body: bytes, now=None) -> bool:
    """True if `header` (Sipbridge-Signature) signs `body` under `secret`, recently."""
    parts = dict(p.split("=", 1) for p in header.split(",") if "=" in p)
    t, v1 = parts.get("t", ""), parts.get("v1", "")
    if not t.isdigit() or abs((now or time.time()) - int(t)) > TOLERANCE_S:
        return False
    want = hmac.new(secret, t.encode() + b"." + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(want, v1)


def handle(event: dict) -> None:
    """What to do with one new event: here, print it."""
    print(json.dumps(event, sort_keys=True), flush=True)


class Receiver(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: sipbridge reuses its connection
    secret = b""
    seen = collections.OrderedDict()
    lock = threading.Lock()

    def answer(self, status: int) -> None:
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_POST(self):  # noqa: N802 (http.server's naming)
        length = int(self.headers.get("Content-Length", "0"))
        if length > MAX_BODY:
            self.answer(413)
            self.close_connection = True
            return
        body = self.rfile.read(length)
        if not verify(self.secret, self.headers.get("Sipbridge-Signature", ""), body):
            self.answer(401)
            return
        event = json.loads(body)
        with self.lock:
            new = event["id"] not in self.seen
            self.seen[event["id"]] = True
            while len(self.seen) > SEEN_MAX:
                self.seen.popitem(last=False)
        if new:
            handle(event)
        self.answer(200)

    def log_message(self, fmt, *args):
        sys.stderr.write("receiver: " + (fmt % args) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8443)
    ap.add_argument("--cert", required=True, help="PEM certificate chain")
    ap.add_argument("--key", required=True, help="PEM private key")
    args = ap.parse_args()
    secret = os.environ.get("EVENTS_SECRET", "").encode()
    if len(secret) < 16:
        sys.exit("EVENTS_SECRET must hold the tenant's events_secret (at least 16 bytes)")
    Receiver.secret = secret
    server = http.server.ThreadingHTTPServer((args.host, args.port), Receiver)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(args.cert, args.key)
    server.socket = tls.wrap_socket(server.socket, server_side=True)
    host, port = server.server_address[:2]
    sys.stderr.write(f"receiver: listening on {host}:{port}\n")
    sys.stderr.flush()
    server.serve_forever()


if __name__ == "__main__":
    main()
