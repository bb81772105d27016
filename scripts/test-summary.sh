#!/usr/bin/env bash
# Print one line per tox env from the logs scripts/pytest.sh kept (.tox/reports/<env>.log),
# then the total as a plain closing line: "total: N passed, N failed, N skipped".
#
# Usage: scripts/test-summary.sh [REPORT_DIR]   (default .tox/reports)
# Exit status: 0 (it only reports; `make test` exits with tox's status).
set -euo pipefail
report_dir=${1:-.tox/reports}

python3 - "$report_dir" <<'PY'
import pathlib
import re
import sys

report_dir = pathlib.Path(sys.argv[1])
ansi = re.compile(r"\x1b\[[0-9;]*m")
# pytest's last line: "==== 3 failed, 120 passed, 2 skipped in 4.56s ====" (or "no tests ran").
final = re.compile(r"^=+ (?P<body>.*?) in [0-9.]+s(?: \([0-9:]+\))? =+$")
count = re.compile(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed|deselected)")

totals = {"passed": 0, "failed": 0, "skipped": 0}
logs = sorted(report_dir.glob("*.log"))
print("==== conveyor test summary (pytest, per tox env) ====")
if not logs:
    print(f"(no reports in {report_dir})")
for log in logs:
    lines = [ansi.sub("", line) for line in log.read_text(errors="replace").splitlines()]
    summary = next((m for m in map(final.match, reversed(lines)) if m), None)
    if summary is None:
        note = next((line for line in lines if line.startswith("pytest.sh:")), None)
        print(f"{log.stem:<16} {note or 'no pytest summary line (crashed or interrupted?)'}")
        continue
    body = summary.group("body")
    for number, word in count.findall(body):
        key = {"error": "failed", "errors": "failed"}.get(word, word)
        if key in totals:
            totals[key] += int(number)
    print(f"{log.stem:<16} {body}")
print(f"total: {totals['passed']} passed, {totals['failed']} failed, {totals['skipped']} skipped")
PY
