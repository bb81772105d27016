#!/usr/bin/env python3
"""Regenerate the figures tables in docs/reliability.md from the fault tests' JSON report.

Usage:
    python scripts/reliability-table.py [REPORT] [--doc docs/reliability.md] [--print] [--check]
        [--section all|figures|hostile]

REPORT defaults to $CONVEYOR_FAULTS_REPORT, else .tox/reports/faults.json (what `tox -e faults`
and `make test` write; tests/support/faults.py: record_figures). The tables replace everything
between the markers ``<!-- figures:start -->`` and ``<!-- figures:end -->`` in the doc, and
the hostile-input suite's table (rows of kind "hostile", written by
tests/faults/hostile_support.py: figures) everything between ``<!-- hostile:start -->`` and
``<!-- hostile:end -->``.

--print   print the tables instead of writing the doc
--section which block to write (default all): "hostile" leaves the figures tables as they are,
          e.g. after a run of only the hostile tests (a report without the figures of the
          redis and amqp envs)
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
HOSTILE_START, HOSTILE_END = "<!-- hostile:start -->", "<!-- hostile:end -->"

#: The classes of issue 13; a hostile scenario's name starts with its class numbers
#: ("3-crashes-prefork", "1-2-4-batch": classes 1, 2 and 4 in one batch).
HOSTILE_CLASSES = {
    "1": "non-transient errors run once",
    "2": "malformed messages",
    "3": "crashes: no zombie slots",
    "4": "ids are data",
    "5": "secrets never printed",
    "6": "refused messages write no result",
    "7": "decompression bounded",
    "8": "per-message time limits",
    "9": "SIGTERM to the process group",
}
#: Figures shown in their own columns; any other figure goes to "details".
_HOSTILE_COLUMNS = (
    "klass", "where", "scenario", "kind", "recorded_at", "bad_inputs", "executions",
    "expected_executions", "lost", "duplicated", "leaked", "seconds", "pool",
)  # fmt: skip

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


def _hostile_class(name: str) -> tuple[list[int], str]:
    """(class numbers, label) of a hostile scenario name such as "1-2-4-batch"."""
    numbers: list[int] = []
    rest = name.split("-")
    while rest and rest[0].isdigit():
        numbers.append(int(rest.pop(0)))
    if not numbers:
        return [99], "other hostile inputs"
    label = " + ".join(f"{n}. {HOSTILE_CLASSES.get(str(n), '?')}" for n in numbers)
    return numbers, label


def _details(row: dict[str, Any]) -> str:
    parts = []
    for key, value in sorted(row.items()):
        if key in _HOSTILE_COLUMNS or value in (None, [], {}):
            continue
        if key == "outcomes" and isinstance(value, dict):
            counts: dict[str, int] = {}
            for outcome in value.values():
                text = str(outcome)
                text = text if len(text) <= 40 else text[:37] + "..."
                counts[text] = counts.get(text, 0) + 1
            value = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
        elif isinstance(value, dict):
            value = ", ".join(f"{k} {_fmt(v)}" for k, v in sorted(value.items()))
        elif isinstance(value, list):
            value = "/".join(_fmt(v) for v in value)
        text = _fmt(value)
        text = text if len(text) <= 60 else text[:57] + "..."
        parts.append(f"{key.replace('_', ' ')}: {text}")
    return "; ".join(parts) or "-"


HOSTILE_HEADERS = [
    "class", "scenario", "broker / backend", "bad inputs", "executions (expected)", "lost",
    "duplicated", "leaked", "seconds", "details",
]  # fmt: skip


def render_hostile(report: dict[str, Any], source: str) -> str:
    """The hostile-input suite's table: one row per scenario and broker/backend/pool."""
    rows = [r for r in report.get("rows", {}).values() if r.get("kind") == "hostile"]
    lines = [HOSTILE_START, ""]
    if not rows:
        lines += [f"No hostile-suite rows in `{source}`: run `tox -e faults`.", "", HOSTILE_END]
        return "\n".join(lines)

    def order(row: dict[str, Any]) -> tuple[Any, ...]:
        return (_hostile_class(row["klass"])[0], row["klass"], row.get("where", ""))

    rows.sort(key=order)
    body = []
    shown = ""
    for row in rows:
        _, label = _hostile_class(str(row.get("klass", "")))
        label, shown = ("" if label == shown else label), label
        expected = row.get("expected_executions")
        executions = row.get("executions")
        if expected is not None:
            executions = f"{_fmt(executions)} ({_fmt(expected)})"
        where = row.get("where")
        if row.get("pool"):
            where = f"{where} ({row['pool']})"
        body.append(
            [label, row.get("klass"), where, row.get("bad_inputs"), executions,
             row.get("lost"), row.get("duplicated"), row.get("leaked"), row.get("seconds"),
             _details(row)]
        )  # fmt: skip
    stamps = sorted(r.get("recorded_at", "") for r in rows if r.get("recorded_at"))
    when = f"{stamps[0]} to {stamps[-1]}" if stamps else "unknown"
    totals = {
        key: sum(r.get(key) or 0 for r in rows)
        for key in ("bad_inputs", "executions", "lost", "duplicated", "leaked")
    }
    lines += [
        f"Generated by `python scripts/reliability-table.py` from `{source}` ({len(rows)} "
        f"hostile scenarios, recorded {when}). Totals: {totals['bad_inputs']:,} bad inputs, "
        f"{totals['executions']:,} executions, {totals['lost']} lost, "
        f"{totals['duplicated']} duplicated, {totals['leaked']} secrets leaked.",
        "",
        *_table(HOSTILE_HEADERS, body),
        "",
        HOSTILE_END,
    ]
    return "\n".join(lines)


def _replace(text: str, start: str, end: str, block: str) -> str | None:
    if start not in text or end not in text:
        return None
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return head + block + tail


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
    parser.add_argument("--section", choices=("all", "figures", "hostile"), default="all")
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
    hostile = render_hostile(report, source)
    if args.check:
        bad = problems(report)
        for line in bad:
            print(f"reliability-table: {line}", file=sys.stderr)
        if bad:
            return 1
    blocks = [(START, END, tables), (HOSTILE_START, HOSTILE_END, hostile)]
    if args.section == "figures":
        blocks = blocks[:1]
    elif args.section == "hostile":
        blocks = blocks[1:]
    if args.print_only:
        print("\n\n".join(block for _, _, block in blocks))
        return 0
    doc = Path(args.doc)
    text: str | None = doc.read_text()
    for start, end, block in blocks:
        assert text is not None
        text = _replace(text, start, end, block)
        if text is None:
            print(f"reliability-table: {doc} has no {start} ... {end} markers", file=sys.stderr)
            return 2
    assert text is not None
    doc.write_text(text)
    print(f"reliability-table: wrote {len(report.get('rows', {}))} scenarios into {doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
