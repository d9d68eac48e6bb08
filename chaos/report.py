"""The chaos run's report: a short text summary and a latency plot with the
nemesis windows shaded (what Jepsen users look at first)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any


@dataclass
class Completed:
    process: int
    f: str
    type: str  # ok | fail | info
    start_s: float
    latency_ms: float


def completed_ops(events: list[dict[str, Any]], t0_ns: int) -> list[Completed]:
    pending: dict[int, dict[str, Any]] = {}
    out = []
    for event in events:
        kind = event.get("type")
        if kind == "invoke":
            pending[event["process"]] = event
        elif kind in ("ok", "fail", "info") and event.get("process") in pending:
            invoke = pending.pop(event["process"])
            out.append(Completed(event["process"], event["f"], kind, (invoke["time"] - t0_ns) / 1e9,
                                 (event["time"] - invoke["time"]) / 1e6))
    return out


def nemesis_windows(events: list[dict[str, Any]], t0_ns: int, end_s: float) -> list[tuple[str, float, float, Any]]:
    windows, open_ = [], None
    for event in events:
        if event.get("type") != "nemesis":
            continue
        at = (event["time"] - t0_ns) / 1e9
        if event["phase"] == "start":
            open_ = (event["name"], at, {k: v for k, v in event.items()
                                         if k not in ("type", "name", "phase", "time", "wall")})
        elif open_ is not None:
            windows.append((open_[0], open_[1], at, open_[2]))
            open_ = None
    if open_ is not None:
        windows.append((open_[0], open_[1], end_s, open_[2]))
    return windows


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def text_report(events: list[dict[str, Any]], t0_ns: int, verdict: dict[str, Any], *, title: str,
                recovery_s: float | None) -> str:
    ops = completed_ops(events, t0_ns)
    end_s = max((op.start_s for op in ops), default=0.0)
    counts = Counter(op.type for op in ops)
    by_f = Counter((op.f, op.type) for op in ops)
    lines = [title, ""]
    lines.append(f"operations: {len(ops)} (ok {counts['ok']}, fail {counts['fail']}, unknown {counts['info']})")
    for f in ("read", "write", "cas"):
        lines.append(f"  {f:5}: ok {by_f[(f, 'ok')]}, fail {by_f[(f, 'fail')]}, unknown {by_f[(f, 'info')]}")
    ok_latencies = [op.latency_ms for op in ops if op.type == "ok"]
    if ok_latencies:
        lines.append("latency of ok operations (ms): "
                     + ", ".join(f"p{int(q * 100)} {_percentile(ok_latencies, q):.1f}" for q in (0.5, 0.9, 0.99))
                     + f", max {max(ok_latencies):.1f}")
    lines.extend(_nemesis_lines(events, t0_ns, end_s))
    if recovery_s is not None:
        lines.append(f"recovered (leader elected, every node caught up) {recovery_s:.1f}s after the final heal")
    lines.append(f"verdict: {verdict.get('verdict', 'error')}")
    anomaly = verdict.get("anomaly")
    if anomaly:
        lines.append("anomaly: " + _short(anomaly))
    return "\n".join(lines)


def _nemesis_lines(events: list[dict[str, Any]], t0_ns: int, end_s: float) -> list[str]:
    lines = ["nemesis:"]
    windows = nemesis_windows(events, t0_ns, end_s)
    for name, start, stop, detail in windows:
        extra = " ".join(f"{k}={v}" for k, v in detail.items())
        lines.append(f"  {start:6.1f}s - {stop:6.1f}s  {name} {extra}".rstrip())
    if not windows:
        lines.append("  (none)")
    return lines


def bus_report(events: list[dict[str, Any]], t0_ns: int, verdict: dict[str, Any], *, title: str,
               recovery_s: float | None, drain: dict[str, Any] | None = None,
               stats: dict[str, Any] | None = None) -> str:
    """The bus run's summary: publishes, receptions, redeliveries, the
    nemesis windows, what the cluster's own counters say, and the verdict
    of ``chaos.bus_workload.check_bus`` with examples of any problem."""
    ops = [op for op in completed_ops(events, t0_ns) if op.f == "publish"]
    end_s = max((op.start_s for op in ops), default=0.0)
    kinds = Counter(op.type for op in ops)
    lines = [title, ""]
    lines.append(f"publish requests: {len(ops)} (ok {kinds['ok']}, fail {kinds['fail']}, unknown {kinds['info']})")
    ok_latencies = [op.latency_ms for op in ops if op.type == "ok"]
    if ok_latencies:
        lines.append("latency of ok publishes (ms): "
                     + ", ".join(f"p{int(q * 100)} {_percentile(ok_latencies, q):.1f}" for q in (0.5, 0.9, 0.99))
                     + f", max {max(ok_latencies):.1f}")
    for topic, row in verdict.get("topics", {}).items():
        published = row["published"]
        lines.append(f"{topic} ({row['guarantee']}): messages published ok {published['ok']}, failed "
                     f"{published['fail']}, unknown {published['unknown']}; answered as duplicates by the "
                     f"server {row['server_dedupes']}")
        lines.append(f"  received {row['received']} ({row['messages_received']} messages), processed "
                     f"{row['processed']}, redelivered {row['redelivered']}, duplicates allowed "
                     f"{row['duplicates_allowed']}, stored more than once {row['stored_more_than_once']}")
        lines.append(f"  lost {row['lost']}, duplicated {row['duplicated']}")
    faults = verdict.get("during_faults", {})
    lines.append(f"during faults: published {faults.get('published', 0)}, received {faults.get('received', 0)}, "
                 f"redelivered {faults.get('redelivered', 0)}")
    for topic, group in ((stats or {}).get("groups") or {}).items():
        if group:
            lines.append(f"cluster counters of {topic}'s group: " + ", ".join(
                f"{k} {group.get(k)}" for k in ("enqueued", "delivered", "redelivered", "acked", "dead_lettered",
                                                "backlog", "pending", "delayed", "dlq")))
    lines.extend(_nemesis_lines(events, t0_ns, end_s))
    if recovery_s is not None:
        lines.append(f"recovered (leader elected, every node caught up) {recovery_s:.1f}s after the final heal")
    if drain is not None:
        state = "every acknowledged publish processed" if not drain["missing"] else \
            f"{drain['missing']} acknowledged publishes never processed"
        lines.append(f"drained for {drain['seconds']:.1f}s: {state}")
    if verdict.get("error"):
        lines.append(f"verdict: none, the run failed: {verdict['error']}")
    elif verdict.get("valid"):
        lines.append("verdict: valid (no acknowledged message lost, no exactly-once message duplicated)")
    else:
        problems = ", ".join(f"{kind} {n}" for kind, n in verdict.get("problems", {}).items())
        lines.append(f"verdict: INVALID ({problems})")
    for example in verdict.get("examples", []):
        lines.append("  " + _short(example, 400))
    return "\n".join(lines)


def _short(value: Any, limit: int = 1500) -> str:
    import json

    text = json.dumps(value, default=str)
    return text if len(text) <= limit else text[:limit] + " ..."


def plot(events: list[dict[str, Any]], t0_ns: int, path: str, *, title: str) -> None:
    """Latency over time, one mark per operation; nemesis windows shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = completed_ops(events, t0_ns)
    end_s = max((op.start_s for op in ops), default=1.0)
    fig, ax = plt.subplots(figsize=(11, 5), dpi=110)
    colors = {"read": "#1f77b4", "write": "#2ca02c", "cas": "#9467bd", "publish": "#17becf"}
    for f, color in colors.items():
        ok = [op for op in ops if op.f == f and op.type == "ok"]
        if not any(op.f == f for op in ops):
            continue  # a workload's own operations only (a bus run publishes, a register run reads)
        ax.scatter([o.start_s for o in ok], [max(o.latency_ms, 0.01) for o in ok], s=4, color=color,
                   alpha=0.6, label=f"{f} ok", linewidths=0)
    failed = [op for op in ops if op.type == "fail"]
    unknown = [op for op in ops if op.type == "info"]
    ax.scatter([o.start_s for o in failed], [max(o.latency_ms, 0.01) for o in failed], s=14, marker="x",
               color="#d62728", label="fail", linewidths=1)
    ax.scatter([o.start_s for o in unknown], [max(o.latency_ms, 0.01) for o in unknown], s=18, marker="D",
               color="#ff7f0e", label="unknown (info)", linewidths=0)
    shades = ["#fdd0a2", "#c6dbef", "#c7e9c0", "#dadaeb", "#fcbba1", "#d9d9d9", "#f7fcb9"]
    names: dict[str, str] = {}
    for name, start, stop, _ in nemesis_windows(events, t0_ns, end_s):
        color = names.setdefault(name, shades[len(names) % len(shades)])
        ax.axvspan(start, stop, color=color, alpha=0.5, lw=0)
    for name, color in names.items():
        ax.axvspan(0, 0, color=color, alpha=0.5, label=f"nemesis: {name}")
    ax.set_yscale("log")
    ax.set_xlabel("time since start (s)")
    ax.set_ylabel("latency (ms, log)")
    ax.set_title(title)
    ax.set_xlim(0, end_s + 1)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="upper left", fontsize=8, ncol=3, framealpha=0.9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
