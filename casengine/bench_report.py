"""What ``casengine bench`` reports: its limits and figures, the table, the JSON and the plot.

The measuring is in :mod:`casengine.bench`; this module only describes and formats results.
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
import ssl
from dataclasses import asdict, dataclass, field
from typing import Any

#: The limits, and what each measures.
LIMITS = {
    "sha256": "hashlib.sha256 over the bytes, one thread",
    "sha256-2t": "hashlib.sha256 on two threads at once, each over the bytes (aggregate)",
    "memcopy": "copy of the bytes into a reused buffer (memory bandwidth)",
    "zstd-3": "zstd level 3 compression, one thread, 4 MiB frames",
    "backend-write": "the backend's raw writer + commit of the bytes, 4 MiB writes",
    "backend-read": "the backend's raw read of that object, 1 MiB chunks",
    "backend-range": "the backend's raw read of 1 MiB in the middle of that object",
}
#: The engine figures: what each measures, and the limit it is paired with.
FIGURES = {
    "ingest": ("Engine.ingest of the bytes", "sha256"),
    "read": ("Engine.read of the stored blob, drained", "backend-read"),
    "range-read": ("Engine.read of 1 MiB in the middle of the blob", "backend-range"),
    "upload-8m": ("uploads.start, 8 MiB appends, commit", "sha256"),
}

#: What the JSON report's numbers mean.
NOTES = [
    "mbps: 10^6 bytes per second, the median of reps",
    "figures ran alternately with their limit (A B A B): limit_mbps is that limit's median",
    "in those pairs, ratio the median of the per-pair speed ratios (1.0 = at the limit)",
]


# -- results --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Limit:
    """One machine limit at one size."""

    name: str
    size: int  #: the blob size of this round
    nbytes: int  #: bytes moved per repetition
    mbps: float  #: median throughput, MB = 10^6 bytes
    reps: int
    #: this limit as a fraction of sha256 on one thread (< 1: it binds before hashing)
    vs_sha256: float


@dataclass(frozen=True, slots=True)
class Figure:
    """One engine figure at one size, next to its limit."""

    name: str
    size: int
    nbytes: int
    mbps: float
    limit: str
    #: the limit's median MB/s in the pairs it ran in, alternately with the figure
    limit_mbps: float
    #: median over the pairs of engine speed / limit speed; 1.00 = at the limit
    ratio: float
    reps: int  #: pairs
    #: writing figures: mbps / the backend-write limit's mbps (a durable write can be the
    #: tighter bound: fsync latency on small blobs, a slow disk on big ones)
    ratio_vs_backend_write: float | None = None


@dataclass
class Report:
    root: str
    backend: str
    sizes: list[int]
    machine: dict[str, Any]
    limits: list[Limit] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        def rounded(d: dict[str, Any]) -> dict[str, Any]:
            # ratios to 4 significant digits: a tiny one must not round to 0
            out = {k: (float(f"{v:.4g}") if "ratio" in k or k == "vs_sha256" else round(v, 1))
                   if isinstance(v, float) else v for k, v in d.items() if v is not None}
            out["size_label"] = size_label(d["size"])
            return out

        return {
            "root": self.root, "backend": self.backend, "sizes": self.sizes,
            "machine": self.machine, "seconds": round(self.seconds, 1),
            "notes": NOTES,
            "limits": [rounded(asdict(x)) | {"what": LIMITS[x.name]} for x in self.limits],
            "figures": [rounded(asdict(f)) | {"what": FIGURES[f.name][0]} for f in self.figures],
        }


def size_label(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} B"


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {"python": platform.python_version(), "openssl": ssl.OPENSSL_VERSION,
                            "cpus": os.cpu_count(), "system": platform.system(),
                            "kernel": platform.release()}
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            cpuinfo = f.read()
        if m := re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.MULTILINE):
            info["cpu"] = m.group(1).strip()
        info["sha_ni"] = bool(re.search(r"^flags\s*:.*\bsha_ni\b", cpuinfo, re.MULTILINE))
    return info


# -- output ----------------------------------------------------------------------------------


def format_table(report: Report) -> str:
    m = report.machine
    lines = [
        f"casengine bench: {report.root} ({report.backend}), {report.seconds:.0f} s",
        (f"machine: {m.get('cpu', '?')}, {m.get('cpus')} CPUs, sha_ni={m.get('sha_ni', '?')}, "
         f"Python {m['python']}, {m['openssl']}"),
        "",
        "limits, measured in this run",
        f"{'limit':<14} {'size':>8} {'MB/s':>9} {'x sha256':>9}  reps",
    ]
    for x in report.limits:
        lines.append(f"{x.name:<14} {size_label(x.size):>8} {x.mbps:>9.0f} "
                     f"{x.vs_sha256:>9.2f}  {x.reps:>4}")
    head = (f"{'figure':<14} {'size':>8} {'MB/s':>9}  {'limit':<14} {'limit MB/s':>10} "
            f"{'ratio':>6} pairs  {'x write':>7}")
    lines += ["", "casengine, next to its limit", head]
    for f in report.figures:
        write = "" if f.ratio_vs_backend_write is None else f"{f.ratio_vs_backend_write:.2f}"
        lines.append(f"{f.name:<14} {size_label(f.size):>8} {f.mbps:>9.0f}  {f.limit:<14} "
                     f"{f.limit_mbps:>10.0f} {f.ratio:>6.2f} {f.reps:>5}  {write:>7}")
    lines += [
        "",
        "MB/s: medians, MB = 10^6 bytes. Each figure ran alternately with its limit (A B A B):",
        "limit MB/s is the limit in those pairs, ratio the median of the per-pair speed ratios",
        "(1.00 = at the limit). x write: a writing figure / backend-write above, the tighter",
        "bound where it is below sha256. Range figures move 1 MiB per repetition.",
    ]
    return "\n".join(lines)


def plot(report: Report, path: str) -> None:
    """Throughput against size, writes on the left and reads on the right; limits dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (
        ("writing", ("ingest", "upload-8m"),
         ("sha256", "sha256-2t", "backend-write", "zstd-3", "memcopy")),
        ("reading", ("read", "range-read"), ("backend-read", "backend-range", "memcopy")),
    )
    sizes = sorted(set(report.sizes))
    colors = {name: f"C{i % 10}" for i, name in enumerate((*FIGURES, *LIMITS))}
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5), sharey=True)
    for ax, (title, figures, limits) in zip(axes, panels, strict=True):
        for name in figures:
            pts = sorted((f.size, f.mbps) for f in report.figures if f.name == name)
            ax.plot(*zip(*pts, strict=True), marker="o", linewidth=2, color=colors[name],
                    label=f"{name} (vs {FIGURES[name][1]})")
        for name in limits:
            pts = sorted((x.size, x.mbps) for x in report.limits if x.name == name)
            if pts:
                ax.plot(*zip(*pts, strict=True), linestyle="--", marker=".", color=colors[name],
                        label=f"limit: {name}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(sizes, [size_label(s) for s in sizes])
        ax.minorticks_off()
        ax.set_xlabel("blob size")
        ax.set_title(f"{title}: {report.root} ({report.backend})")
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize="small")
    axes[0].set_ylabel("MB/s (10^6 bytes/s, median)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
