"""Run moto's S3 server on 127.0.0.1 for development, until Ctrl-C.

    python3 tools/s3server.py [--port PORT]

Prints the endpoint and the storage options to open a backend on it, for example
``open_backend("s3://bucket/prefix", endpoint_url=..., key="testing", secret="testing")``.
Buckets must be created first (``aws --endpoint-url ... s3 mb s3://bucket`` or boto3).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from casengine.testing.s3server import DUMMY_CREDENTIALS, MotoServer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=None, help="port (default: a free one)")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stop the server on kill, too
    signal.signal(signal.SIGINT, signal.default_int_handler)
    with MotoServer(args.port) as server:
        print(f"S3 endpoint: {server.endpoint}", flush=True)
        print(f"storage options: endpoint_url={server.endpoint!r}, key="
              f"{DUMMY_CREDENTIALS['key']!r}, secret={DUMMY_CREDENTIALS['secret']!r}", flush=True)
        print("Ctrl-C stops it.", flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            print("stopping", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
