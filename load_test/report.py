"""Report a sweep: a terminal table, JSON, CSV and a PNG plot; ratios between two servers."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from load_test.load_generator import CLOSED_MODES, StepReport

COLUMNS = [
    "server",
    "mode",
    "load",
    "requests",
    "throughput",
    "p50_s",
    "p95_s",
    "p99_s",
    "max_s",
    "mean_batch_size",
    "model_busy",
    "mean_step_captions",
    "cpu_ms_per_image",
    "api_cpu_ms_per_image",
    "decode_cpu_ms_per_image",
    "model_cpu_ms_per_image",
    "model_loop_cpu_ms_per_image",
    "statuses",
]


def table(steps: list[StepReport]) -> str:
    rows = [[str(step.row()[c]) for c in COLUMNS] for step in steps]
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(COLUMNS)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(COLUMNS, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def ratios(steps: list[StepReport], server: str, baseline: str) -> list[dict]:
    """Per closed-loop concurrency both servers ran: throughput and p95 of `server` over `baseline`."""
    by_key = {(s.server, s.mode, s.load): s for s in steps}
    out = []
    for step in steps:
        other = by_key.get((baseline, step.mode, step.load))
        if step.server != server or other is None or not other.throughput:
            continue
        out.append(
            {
                "mode": step.mode,
                "load": step.load,
                "throughput_ratio": round(step.throughput / other.throughput, 2),
                "p95_ratio": round(step.p95_s / other.p95_s, 2) if other.p95_s else None,
            }
        )
    return out


def write_all(steps: list[StepReport], out_dir: Path, extra: dict | None = None) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, csv_path, png_path = out_dir / "results.json", out_dir / "results.csv", out_dir / "results.png"
    json_path.write_text(json.dumps({"steps": [s.row() for s in steps], **(extra or {})}, indent=2))
    with open(csv_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(steps[0].row()))
        writer.writeheader()
        for step in steps:
            writer.writerow({k: json.dumps(v) if isinstance(v, dict) else v for k, v in step.row().items()})
    plot(steps, png_path)
    return [json_path, csv_path, png_path]


def plot(steps: list[StepReport], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    # Closed-loop steps only: open-loop rates are in the table, JSON and CSV.
    for server in dict.fromkeys(s.server for s in steps if s.mode in CLOSED_MODES):
        points = sorted((s.load, s.throughput, s.p95_s) for s in steps if s.server == server and s.mode in CLOSED_MODES)
        loads, throughput, p95 = zip(*points)
        left.plot(loads, throughput, marker="o", label=server)
        right.plot(loads, p95, marker="o", label=server)
    left.set(xlabel="concurrent clients", ylabel="images / s", title="Throughput")
    right.set(xlabel="concurrent clients", ylabel="seconds", title="p95 latency", yscale="log")
    from matplotlib.ticker import FuncFormatter, NullFormatter

    plain = FuncFormatter(lambda value, _: f"{value:g}")  # 1, 4, 8, 16 and 0.5, 10: not 2^k or 3x10^1
    loads = sorted({s.load for s in steps if s.mode in CLOSED_MODES})
    for axis in (left, right):
        axis.set_xscale("log", base=2)
        axis.set_xticks(loads)
        axis.xaxis.set_major_formatter(plain)
        axis.xaxis.set_minor_formatter(NullFormatter())
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=8)
    right.yaxis.set_major_formatter(plain)
    right.yaxis.set_minor_formatter(FuncFormatter(lambda value, _: f"{value:g}" if f"{value:g}"[0] in "125" else ""))
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
