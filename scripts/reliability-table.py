#!/usr/bin/env python3
"""Regenerate the figures tables in docs/reliability.md from the fault tests' JSON report.

Usage:
    python scripts/reliability-table.py [REPORT] [--doc docs/reliability.md] [--print] [--check]

REPORT defaults to $CONVEYOR_FAULTS_REPORT, else .tox/reports/faults.json (what `tox -e faults`
and `make test` write; tests/faultsupport.py: record_figures). The tables replace everything
between the markers ``<!-- figures:start -->`` and ``<!-- figures:end -->`` in the doc.

--print   print the tables instead of writing the doc
--check   exit 1 if the report has a row with lost > 0 or a failed duplicate bound
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- figures:start -->", "<!-- figures:end -->"

KIND_TITLES = {
    "sigkill": "Workers SIGKILLed mid-task (tests/faults/test_worker_sigkill.py)",
    "restart": "Server restarted mid-run (test_server_restart.py, test_amqp_restart.py)",
    "network": "Connections cut, refused and slowed by a TCP proxy (test_network_faults.py)",
    "soak": "Soak through 4 worker processes (test_soak.py)",
    "bad-input": "Bad input (test_bad_input_brokers.py, tests/runtime/test_bad_input.py)",
    "expiry": "Result expiry (test_result_expiry.py)",
}


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        return ", ".join(_fmt(v) for v in value) or "-"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _table(headers: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return out


def _section(kind: str, rows: list[dict[str, Any]]) -> list[str]:
    rows = sorted(rows, key=lambda r: r["scenario"])
    if kind == "sigkill":
        headers = ["broker", "pool", "tasks", "kills", "lost", "duplicated", "bound", "seconds"]
        body = [
            [r.get("broker"), r.get("pool"), r.get("tasks"), r.get("kills"), r.get("lost"),
             r.get("duplicated"), r.get("duplicate_bound"), r.get("seconds")]
            for r in rows
        ]  # fmt: skip
    elif kind == "restart":
        headers = ["broker", "tasks", "restarts", "outage s", "resumed after s",
                   "publish retries", "lost", "duplicated", "seconds"]  # fmt: skip
        body = [
            [r.get("broker"), r.get("tasks"), r.get("restarts"), r.get("outage_seconds"),
             r.get("resume_seconds"), r.get("publish_retries"), r.get("lost"),
             r.get("duplicated"), r.get("seconds")]
            for r in rows
        ]  # fmt: skip
    elif kind == "network":
        headers = ["broker", "published", "publish OK", "publish raised", "cuts", "connections",
                   "resumed after s", "lost", "duplicated", "seconds"]  # fmt: skip
        body = [
            [r.get("broker"), r.get("tasks"), r.get("moved"), r.get("publish_raised"),
             r.get("cuts"), r.get("connections"), r.get("resume_seconds"), r.get("lost"),
             r.get("duplicated"), r.get("seconds")]
            for r in rows
        ]  # fmt: skip
    elif kind == "soak":
        headers = ["broker", "tasks", "workers", "publish s", "all done s", "tasks/s",
                   "lost", "results missing", "duplicated"]  # fmt: skip
        body = [
            [r.get("broker"), r.get("tasks"), r.get("workers"), r.get("publish_seconds"),
             r.get("seconds"), r.get("tasks_per_second"), r.get("lost"),
             r.get("results_missing"), r.get("duplicated")]
            for r in rows
        ]  # fmt: skip
    elif kind == "bad-input":
        headers = ["where", "bad inputs", "good messages", "dead-lettered", "lost"]
        body = [
            [r["scenario"].split("/", 1)[1], r.get("bad_inputs"), r.get("moved"),
             r.get("dead_lettered"), r.get("lost")]
            for r in rows
        ]  # fmt: skip
    else:  # expiry
        headers = ["backend", "written", "without expiry", "left after expiry"]
        body = [
            [r.get("backend"), r.get("written"), r.get("without_ttl"), r.get("left_after_ttl")]
            for r in rows
        ]
    return [f"**{KIND_TITLES.get(kind, kind)}**", "", *_table(headers, body), ""]


def render(report: dict[str, Any], source: str) -> str:
    rows: list[dict[str, Any]] = list(report.get("rows", {}).values())
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_kind.setdefault(row.get("kind", "other"), []).append(row)
    moved_kinds = ("sigkill", "restart", "network", "soak", "bad-input")
    totals = [
        ["kills survived", sum(r.get("kills", 0) for r in by_kind.get("sigkill", []))],
        ["server restarts survived", sum(r.get("restarts", 0) for r in by_kind.get("restart", []))],
        ["connection cuts survived", sum(r.get("cuts", 0) for r in by_kind.get("network", []))],
        ["messages moved", sum(r.get("moved", 0) for k in moved_kinds for r in by_kind.get(k, []))],
        ["lost", sum(r.get("lost", 0) for r in rows)],
        ["duplicated", sum(r.get("duplicated", 0) for r in rows)],
        ["bad inputs tried", sum(r.get("bad_inputs", 0) for r in by_kind.get("bad-input", []))],
        ["result records inspected for expiry",
         sum(r.get("written", 0) for r in by_kind.get("expiry", []))],
    ]  # fmt: skip
    stamps = sorted(r.get("recorded_at", "") for r in rows if r.get("recorded_at"))
    when = f"{stamps[0]} to {stamps[-1]}" if stamps else "unknown"
    lines = [
        START,
        "",
        f"Generated by `python scripts/reliability-table.py` from `{source}` ({len(rows)} "
        f"scenarios, recorded {when}).",
        "",
        *_table(["total", "count"], totals),
        "",
    ]
    for kind in ("sigkill", "restart", "network", "soak", "bad-input", "expiry"):
        if by_kind.get(kind):
            lines += _section(kind, by_kind[kind])
    lines.append(END)
    return "\n".join(lines)


def problems(report: dict[str, Any]) -> list[str]:
    found = []
    for row in report.get("rows", {}).values():
        if row.get("lost"):
            found.append(f"{row['scenario']}: lost {row['lost']}")
        bound = row.get("duplicate_bound")
        if bound is not None and row.get("duplicated", 0) > bound:
            found.append(f"{row['scenario']}: {row['duplicated']} duplicates > bound {bound}")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("report", nargs="?", default=None)
    parser.add_argument("--doc", default=str(ROOT / "docs" / "reliability.md"))
    parser.add_argument("--print", action="store_true", dest="print_only")
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    path = Path(
        args.report
        or os.environ.get("CONVEYOR_FAULTS_REPORT")
        or ROOT / ".tox" / "reports" / "faults.json"
    )
    if not path.exists():
        print(f"reliability-table: no report at {path}: run `tox -e faults` first", file=sys.stderr)
        return 2
    report = json.loads(path.read_text())
    try:
        source = str(path.resolve().relative_to(ROOT))
    except ValueError:
        source = str(path)
    tables = render(report, source)
    if args.check:
        bad = problems(report)
        for line in bad:
            print(f"reliability-table: {line}", file=sys.stderr)
        if bad:
            return 1
    if args.print_only:
        print(tables)
        return 0
    doc = Path(args.doc)
    text = doc.read_text()
    if START not in text or END not in text:
        print(f"reliability-table: {doc} has no {START} ... {END} markers", file=sys.stderr)
        return 2
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    doc.write_text(head + tables + tail)
    print(f"reliability-table: wrote {len(report.get('rows', {}))} scenarios into {doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
