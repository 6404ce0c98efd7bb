"""Prometheus metrics of one server process: requests by route and status, bytes in and out."""

from __future__ import annotations

import threading
from collections import Counter


class Metrics:
    def __init__(self) -> None:
        self._requests: Counter[tuple[str, str, int]] = Counter()
        self._bytes_in: Counter[str] = Counter()
        self._bytes_out: Counter[str] = Counter()
        self._zerocopy = 0
        self._lock = threading.Lock()

    def observe(self, route: str, method: str, status: int, bytes_in: int, bytes_out: int,
                zerocopy: int = 0) -> None:
        """One request; ``zerocopy`` is the part of ``bytes_out`` sent with ``sendfile``."""
        with self._lock:
            self._requests[(route, method, status)] += 1
            self._bytes_in[route] += bytes_in
            self._bytes_out[route] += bytes_out
            self._zerocopy += zerocopy

    def render(self, open_uploads: int) -> str:
        lines = ["# HELP casengine_http_requests_total HTTP requests by route, method and status.",
                 "# TYPE casengine_http_requests_total counter"]
        with self._lock:
            for (route, method, status), n in sorted(self._requests.items()):
                lines.append(f'casengine_http_requests_total{{route="{route}",method="{method}",'
                             f'status="{status}"}} {n}')
            for name, counter, what in (("in", self._bytes_in, "received"),
                                        ("out", self._bytes_out, "sent")):
                lines += [f"# HELP casengine_http_bytes_{name}_total Body bytes {what} by route.",
                          f"# TYPE casengine_http_bytes_{name}_total counter"]
                lines += [f'casengine_http_bytes_{name}_total{{route="{r}"}} {n}'
                          for r, n in sorted(counter.items())]
            lines += ["# HELP casengine_http_zerocopy_bytes_total Body bytes sent with sendfile.",
                      "# TYPE casengine_http_zerocopy_bytes_total counter",
                      f"casengine_http_zerocopy_bytes_total {self._zerocopy}"]
        lines += ["# HELP casengine_upload_sessions_open Upload sessions not yet committed.",
                  "# TYPE casengine_upload_sessions_open gauge",
                  f"casengine_upload_sessions_open {open_uploads}"]
        return "\n".join(lines) + "\n"
