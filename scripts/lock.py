#!/usr/bin/env python3
"""conveyor's lock, constraints.txt: write it, check that it is current, verify an env against it.

Usage (from the repository root; the Makefile runs these):
    scripts/lock.py write [--upgrade]   rewrite constraints.txt (and the test server's
                                        scripts/mongo-test-server.txt) with uv (`make lock`,
                                        `make lock-upgrade`)
    scripts/lock.py check               fail when the lock's inputs (pyproject.toml, tox.ini's
                                        deps, services.sh's SECANTUS_SPEC) changed since then
    scripts/lock.py verify [--ignore-seed] [--against FILE] [--report FILE]
                                        compare what this interpreter has installed with the lock

Why a constraints file (and not uv.lock). Every installer that builds one of our envs reads a
constraints file: pip in `make venv` and `make bench` (`-c`), pip again in tox's own virtualenv
runner, uv in tox-uv's runner. tox.ini hands the file to both through PIP_CONSTRAINT and
UV_CONSTRAINT (set_env), so it also pins what `deps` cannot reach: the dependencies of the
package's extras and the `.pkg` env that builds the wheel (setuptools, wheel). A uv.lock is
read by uv alone (`uv sync`, tox-uv's lock runner): pip and plain tox could not use it, and
we would need a second, exported file for them. Constraints rather than requirements: an env
still installs only what its extras and deps ask for (the `unit` env keeps proving that the
core imports no driver), each at the locked version.

One universal resolution (`uv pip compile --universal`) covers Python 3.10 to 3.13 on every
platform: where the newest release of a package dropped an older Python (pymongo, SQLAlchemy
and numpy need 3.11 now), the lock pins it once per Python version with a marker, so each
interpreter gets the newest release it can run. No hashes: pip refuses them with the editable
install of `make venv`, and a release on PyPI can never be replaced, so a version pin selects
the same code.

The lock's header records a hash of its inputs (pyproject.toml's dependencies, every extra,
requires-python and build-system.requires; every `deps` line of tox.ini; the test server's
spec in scripts/services.sh; the extra inputs and uv options below). `check` recomputes it:
`make test`, `make venv` and tox's `lint` env refuse a lock written for other inputs, instead
of testing something nobody locked.
"""

from __future__ import annotations

import argparse
import configparser
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "constraints.txt"
PROJECT = "conveyor"  # the package itself is built from the tree, never pinned
# Installed into the dev venv besides the project (make venv): pip itself, so the installer
# of `make venv` is pinned too.
EXTRA_INPUTS = ["pip"]
UV_OPTIONS = ["--universal", "--no-config"]
# The MongoDB-protocol test server (SecantusDB, GPL-2.0: a test-time tool, never a dependency
# of conveyor) lives in its own venv, which scripts/services.sh installs with its own lock,
# written here too. Its spec is read from services.sh, so the pin stays in one place.
SERVICES = ROOT / "scripts" / "services.sh"
SERVER_LOCK = ROOT / "scripts" / "mongo-test-server.txt"
SERVER_SPEC = re.compile(r"^SECANTUS_SPEC='([^']+)'", re.MULTILINE)
HASH_PREFIX = "# inputs-sha256: "
# Put into a venv by the tool that created it (virtualenv's or uv's seed, Python's ensurepip),
# not installed from the lock: their versions follow the pinned virtualenv/uv/Python. `make
# venv` installs pinned ones anyway, so it verifies without --ignore-seed.
SEED = {"pip", "setuptools", "wheel"}
HEADER = """\
# conveyor's lock: the exact version of every package that `make venv`, `make bench` and every
# tox env install, for Python 3.10 to 3.13 (one universal resolution: a package whose newest
# release dropped an older Python is pinned per version with a marker). pip reads it with -c
# (make venv, make bench), tox through PIP_CONSTRAINT / UV_CONSTRAINT (tox.ini's set_env).
# Do not edit: `make lock` rewrites it from pyproject.toml and tox.ini, keeping the pins that
# still fit; `make lock-upgrade` takes the newest releases. Why a constraints file:
# scripts/lock.py. `make test` refuses to run when the inputs no longer match this hash.
"""
SERVER_HEADER = """\
# The MongoDB-protocol test server's venv (scripts/services.sh installs SecantusDB with -c
# this file). Written by `make lock` with constraints.txt, whose hash covers its spec.
"""


def _toml() -> object:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ImportError:
            return None
    return tomllib


def normalize(name: str) -> str:
    """PEP 503 name: `PyYAML`, `pyyaml` and `py_yaml` are one package."""
    return re.sub(r"[-_.]+", "-", name).lower()


def tox_deps() -> list[str]:
    """Every requirement named in a `deps` option of tox.ini (references and options skipped)."""
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(ROOT / "tox.ini")
    deps = set()
    for section in parser.sections():
        for line in parser[section].get("deps", "").splitlines():
            line = line.split(" #", 1)[0].strip()
            if line and not line.startswith(("#", "{", "-")):
                deps.add(line)
    return sorted(deps)


def lock_inputs(tomllib: object) -> dict[str, object]:
    """Everything the resolution depends on, in a stable form (order and comments ignored)."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())  # type: ignore[attr-defined]
    project = pyproject["project"]
    extras = project.get("optional-dependencies", {})
    return {
        "requires-python": project.get("requires-python", ""),
        "dependencies": sorted(project.get("dependencies", [])),
        "optional-dependencies": {name: sorted(reqs) for name, reqs in sorted(extras.items())},
        "build-system.requires": sorted(pyproject.get("build-system", {}).get("requires", [])),
        "tox.ini deps": tox_deps(),
        "extra inputs": EXTRA_INPUTS,
        "uv options": UV_OPTIONS,
        "test server": server_spec(),
    }


def server_spec() -> str:
    match = SERVER_SPEC.search(SERVICES.read_text())
    if not match:
        sys.exit(f"lock.py: no SECANTUS_SPEC='...' line in {SERVICES.relative_to(ROOT)}")
    return match.group(1)


def inputs_hash(inputs: dict[str, object]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def recorded_hash() -> str | None:
    if not LOCK.exists():
        return None
    for line in LOCK.read_text().splitlines():
        if line.startswith(HASH_PREFIX):
            return line[len(HASH_PREFIX) :].strip()
    return None


def need_toml() -> object:
    tomllib = _toml()
    if tomllib is not None:
        return tomllib
    # A bare Python 3.10 has no TOML parser; the dev venv has tomli (pytest needs it there).
    venv_python = ROOT / ".venv" / "bin" / "python"
    if venv_python.exists() and Path(sys.executable).resolve() != venv_python.resolve():
        # Re-run this script, unchanged, under the venv's interpreter.
        os.execv(str(venv_python), [str(venv_python), __file__, *sys.argv[1:]])  # noqa: S606
    sys.exit("lock.py: needs Python >= 3.11 (tomllib) or tomli to read pyproject.toml")


def cmd_check() -> int:
    tomllib = _toml()
    if tomllib is None:
        venv_python = ROOT / ".venv" / "bin" / "python"
        if not venv_python.exists():
            # First `make venv` on a bare 3.10: nothing can parse TOML yet; tox's lint env
            # (which has tomli) and every later `make test` check it.
            print("lock.py: no TOML parser in this Python yet: lock check left to tox's lint env")
            return 0
        tomllib = need_toml()
    expected = inputs_hash(lock_inputs(tomllib))
    found = recorded_hash()
    if found == expected:
        return 0
    what = "is missing" if not LOCK.exists() else "was written for other dependencies"
    print(
        f"lock.py: {LOCK.name} {what}: its inputs (pyproject.toml's dependencies, tox.ini's "
        f"deps, services.sh's SECANTUS_SPEC) changed since `make lock`.\n"
        f"  Run `make lock` (keeps the pins that still fit) and commit {LOCK.name} and "
        f"{SERVER_LOCK.relative_to(ROOT)} with the change.\n"
        f"  recorded {found}\n  expected {expected}",
        file=sys.stderr,
    )
    return 1


def find_uv() -> str:
    for candidate in (os.environ.get("UV"), str(ROOT / ".venv" / "bin" / "uv"), shutil.which("uv")):
        if candidate and Path(candidate).exists():
            return candidate
    sys.exit("lock.py: uv not found (`make lock` installs the pinned one into .venv)")


def min_python(requires_python: str) -> str:
    match = re.search(r">=\s*(\d+\.\d+)", requires_python)
    if not match:
        sys.exit(f"lock.py: cannot read a lowest Python from requires-python {requires_python!r}")
    return match.group(1)


def compile_lock(
    uv: str, sources: list[Path], out: Path, python: str, upgrade: bool, *options: str
) -> None:
    """Resolve `sources` into `out` (kept pins of an existing `out` preferred unless upgrading)."""
    command = [
        uv,
        "pip",
        "compile",
        *UV_OPTIONS,
        *options,
        "--python-version",
        python,
        "--quiet",
        "--custom-compile-command",
        "make lock",
        *(["--upgrade"] if upgrade else []),
        *map(str, sources),
        "--output-file",
        str(out),
    ]
    subprocess.run(command, cwd=ROOT, check=True)


def cmd_write(upgrade: bool) -> int:
    tomllib = need_toml()
    inputs = lock_inputs(tomllib)
    uv = find_uv()
    python = min_python(str(inputs["requires-python"]))
    with tempfile.TemporaryDirectory() as tmp:
        # What pyproject.toml's [project] does not say: tox.ini's deps, the build backend (for
        # tox's .pkg env) and pip. uv reads the project's dependencies and extras itself.
        extra_in = Path(tmp) / "tox-deps-build-system-pip.in"
        extra_in.write_text(
            "\n".join([*inputs["tox.ini deps"], *inputs["build-system.requires"], *EXTRA_INPUTS])  # type: ignore[misc]
            + "\n"
        )
        out = Path(tmp) / "constraints.txt"
        if LOCK.exists() and not upgrade:
            shutil.copyfile(LOCK, out)  # uv keeps the versions of an existing output file
        compile_lock(uv, [Path("pyproject.toml"), extra_in], out, python, upgrade, "--all-extras")
        body = out.read_text().replace(f"-r {extra_in}", "tox.ini deps, build-system, pip")
        server_in = Path(tmp) / "secantus-spec-in-services-sh.in"
        server_in.write_text(server_spec() + "\n")
        server_out = Path(tmp) / SERVER_LOCK.name
        if SERVER_LOCK.exists() and not upgrade:
            shutil.copyfile(SERVER_LOCK, server_out)
        compile_lock(uv, [server_in], server_out, python, upgrade)
        server_body = server_out.read_text().replace(f"-r {server_in}", "services.sh")
    SERVER_LOCK.write_text(SERVER_HEADER + server_body)
    LOCK.write_text(HEADER + HASH_PREFIX + inputs_hash(inputs) + "\n" + body)
    print(f"lock.py: wrote {LOCK.name} and {SERVER_LOCK.relative_to(ROOT)}: commit them")
    return 0


def read_pins(path: Path) -> dict[str, list[tuple[str, str | None]]]:
    """name -> [(version, marker or None)] from a `name==version ; marker` constraints file."""
    pins: dict[str, list[tuple[str, str | None]]] = {}
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        requirement, _, marker = line.partition(";")
        name, sep, version = requirement.partition("==")
        if not sep:
            sys.exit(f"lock.py: {path}: not a pin: {raw!r}")
        pins.setdefault(normalize(name.strip()), []).append(
            (version.strip(), marker.strip() or None)
        )
    return pins


def marker_evaluator() -> object:
    try:
        from packaging.markers import Marker
    except ImportError:
        try:
            from pip._vendor.packaging.markers import Marker  # type: ignore[no-redef]
        except ImportError:
            return None
    return Marker


def pinned_version(candidates: list[tuple[str, str | None]], marker_cls: object) -> set[str]:
    """The versions the lock allows this interpreter (all of them if markers can't be read)."""
    if marker_cls is None:
        return {version for version, _ in candidates}
    return {
        version
        for version, marker in candidates
        if marker is None or marker_cls(marker).evaluate()  # type: ignore[operator]
    }


def cmd_verify(ignore_seed: bool, against: str | None, report: str | None) -> int:
    """Every installed distribution must be in the lock, at its pinned version.

    With --against pointing elsewhere than the lock (make test-latest passes /dev/null), the
    env is unlocked on purpose: the differences are listed (to --report too), never fatal.
    """
    from importlib import metadata

    locked = against is None or Path(against).resolve() == LOCK.resolve()
    pins = read_pins(LOCK)
    marker_cls = marker_evaluator()
    problems = []
    for dist in sorted(metadata.distributions(), key=lambda d: normalize(d.metadata["Name"])):
        name = normalize(dist.metadata["Name"])
        if name == PROJECT or (ignore_seed and name in SEED):
            continue
        if name not in pins:
            problems.append(f"{name} {dist.version}: not in {LOCK.name}")
            continue
        allowed = pinned_version(pins[name], marker_cls)
        if dist.version not in allowed:
            pinned = " or ".join(sorted(allowed)) or "none for this Python"
            problems.append(f"{name} {dist.version}: {LOCK.name} pins {pinned}")
    env = os.environ.get("TOX_ENV_NAME", sys.prefix)
    if locked:
        if problems:
            print(f"lock.py: {env} does not match {LOCK.name}:", file=sys.stderr)
            for problem in problems:
                print(f"  {problem}", file=sys.stderr)
            print(
                "  An env built before this lock or changed by hand: recreate it "
                "(rm -rf .venv && make venv; tox -r).",
                file=sys.stderr,
            )
            return 1
        print(f"lock.py: {env}: every installed package is at its {LOCK.name} version")
        return 0
    lines = [f"{env}: {problem}" for problem in problems]
    print(
        f"lock.py: {env} was installed without {LOCK.name} (constraints: {against}); it differs in:"
    )
    print("\n".join(f"  {line}" for line in lines) or "  none")
    if report:
        Path(report).parent.mkdir(parents=True, exist_ok=True)
        Path(report).write_text("".join(f"{line}\n" for line in lines))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    write = sub.add_parser("write", help="rewrite constraints.txt with uv")
    write.add_argument("--upgrade", action="store_true", help="take the newest releases")
    sub.add_parser("check", help="fail when the lock's inputs changed since it was written")
    verify = sub.add_parser("verify", help="compare this interpreter's packages with the lock")
    verify.add_argument("--ignore-seed", action="store_true", help=f"skip {sorted(SEED)}")
    verify.add_argument("--against", help="the constraints file the env was installed with")
    verify.add_argument("--report", help="unlocked: also write the differences to this file")
    args = parser.parse_args()
    if args.command == "write":
        return cmd_write(args.upgrade)
    if args.command == "check":
        return cmd_check()
    return cmd_verify(args.ignore_seed, args.against, args.report)


if __name__ == "__main__":
    sys.exit(main())
