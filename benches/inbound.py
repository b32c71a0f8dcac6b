#!/usr/bin/env python3
"""The inbound listener's rate: DSNs per second received over SMTP, read, attributed and
recorded (each one a hard bounce that changes a subscriber's status and appends its
events, committed before the 250).

Starts `letterbox serve` (the release binary) on a fresh data directory with
`--bounce-domain` and `--inbound-smtp`, imports N subscribers, then sends one RFC 3464
DSN per subscriber over C parallel SMTP connections (Python's smtplib) and times them
from the first MAIL FROM to the last 250. Checks that every subscriber ended `bounced`
(through /metrics' count of inbound messages). On PostgreSQL with --database URL.

    python3 benches/inbound.py [--messages 5000] [--connections 8] [--binary B]
"""

import argparse
import os
import re
import shutil
import smtplib
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from send import BINARY, ENV, TOKEN, call, free_port, wait_healthy, warm  # noqa: E402

DOMAIN = "bounces.bench.example"


def dsn(recipient):
    return (
        f"From: MAILER-DAEMON@mx.example.org\r\nTo: postmaster@{DOMAIN}\r\n"
        "Subject: Undelivered Mail Returned to Sender\r\nAuto-Submitted: auto-replied\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="B"\r\n\r\n'
        "--B\r\nContent-Type: text/plain\r\n\r\nYour message could not be delivered.\r\n"
        "--B\r\nContent-Type: message/delivery-status\r\n\r\n"
        "Reporting-MTA: dns; mx.example.org\r\n\r\n"
        f"Final-Recipient: rfc822; {recipient}\r\nAction: failed\r\nStatus: 5.1.1\r\n"
        f"Diagnostic-Code: smtp; 550 5.1.1 <{recipient}>: User unknown\r\n\r\n"
        "--B\r\nContent-Type: text/rfc822-headers\r\n\r\n"
        f"From: news@example.com\r\nTo: {recipient}\r\nSubject: Hello\r\n\r\n--B--\r\n"
    )


def metric(base, name):
    request = urllib.request.Request(f"{base}/metrics", headers={"authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(request) as response:
        text = response.read().decode()
    return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--binary", default=BINARY)
    parser.add_argument("--database", help="postgres://… of an empty database (default: redb)")
    args = parser.parse_args()
    if not os.path.exists(args.binary):
        sys.exit("build first: cargo build --release")

    data = tempfile.mkdtemp(prefix="letterbox-inbound-")
    port, smtp_port = free_port(), free_port()
    extra = ["--database", args.database] if args.database else []
    if not args.database:
        warm(args.binary, data, port)
    server = subprocess.Popen(
        [args.binary, "serve", "--listen", f"127.0.0.1:{port}", "--data", data,
         "--bounce-domain", DOMAIN, "--inbound-smtp", f"127.0.0.1:{smtp_port}", *extra],
        stdout=subprocess.DEVNULL, env={**ENV, "LETTERBOX_LOG": "warn"})
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base)
        newsletter = call(base, "POST", "/v1/newsletters", {"name": "Inbound", "from": "news@example.com"})["id"]
        people = [{"email": f"r{i}@example.org"} for i in range(args.messages)]
        for start in range(0, len(people), 5000):
            call(base, "POST", f"/v1/newsletters/{newsletter}/subscribers", people[start:start + 5000])

        errors = []

        def lane(indices):
            try:
                with smtplib.SMTP("127.0.0.1", smtp_port, timeout=60) as client:
                    client.ehlo("mx.example.org")
                    for i in indices:
                        client.sendmail("", [f"postmaster@{DOMAIN}"], dsn(f"r{i}@example.org"))
            except Exception as e:  # noqa: BLE001
                errors.append(repr(e))

        lanes = [threading.Thread(target=lane, args=(range(c, args.messages, args.connections),))
                 for c in range(args.connections)]
        started = time.monotonic()
        for t in lanes:
            t.start()
        for t in lanes:
            t.join()
        seconds = time.monotonic() - started
        if errors:
            sys.exit(f"{len(errors)} lane(s) failed: {errors[:3]}")
        received = metric(base, "letterbox_inbound_messages_total")
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(data, ignore_errors=True)

    if received != args.messages:
        sys.exit(f"the listener counted {received:.0f} of {args.messages} messages")
    store = "postgres" if args.database else "redb"
    print(f"{store}: {args.messages} DSNs over {args.connections} connections in {seconds:.2f} s: "
          f"{args.messages / seconds:,.0f} messages/s read, attributed and recorded")


if __name__ == "__main__":
    main()
