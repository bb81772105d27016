"""Secrets never printed (issue 13, class 5), by the real CLI in subprocesses: every byte
they write to stdout and stderr (logs at debug level included) is searched.

Secrets are tokens ``QZ<nn>`` inside passwords and option values of many shapes: raw
``@ # ? ;`` and spaces in the password, a user name holding ``@``, ``?password=``,
``sentinel_password=``, ``ssl_keyfile_password=``, ``tlsCertificateKeyFilePassword=``,
``security_key``, ``broker_transport_options={'password': ...}`` and nested secrets. A
partial leak shows as a surviving ``QZ<nn>`` (no scheme, host, key or message has one).

* ``conveyor check`` on each URL: unreachable hosts, refused logins (RabbitMQ, MariaDB),
  bad options, malformed credentials;
* a worker (``-l debug``) on a private password-protected Redis, with a signing key and
  secret transport options, that runs a task; its banner shows the masked URL;
* workers that cannot start: unreachable broker, refused login, unknown secret options, a
  signing key too short; ``conveyor call`` and ``conveyor result``.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from hostile_support import (
    AMQP_URL,
    cli_env,
    conveyor_cmd,
    figures,
    no_secret,
)
from support.faults import free_port, wait_port

from conveyor.core.urls import mask_url
from conveyor.testing.support import requirement_missing, unique_name

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

MARK = re.compile(r"QZ\d\d")

#: URL -> why it fails. Every QZnn in a URL is a secret.
CHECK_URLS = {
    "redis://:QZ01%40%23%3F%3B%2F%20x@127.0.0.1:1/0": "unreachable, encoded specials",
    "redis://:QZ02@x@127.0.0.1:1/0": "raw @ in the password",
    "redis://user@QZ03:QZ04pw@127.0.0.1:1/0": "user name holding @",
    "redis://u:QZ05 pass@127.0.0.1:1/0": "space in the password",
    "redis://u:QZ06;x@127.0.0.1:1/0": "raw ; in the password",
    "redis://u:QZ22\tx@127.0.0.1:1/0": "tab in the password",
    "redis://127.0.0.1:1/0?password=QZ07": "?password= (not a Redis broker option)",
    "sentinel://127.0.0.1:1/0?master_name=m&sentinel_password=QZ08&bogus=1": "sentinel",
    "rediss://127.0.0.1:1/0?ssl_keyfile_password=QZ09&ssl_cert_reqs=none": "ssl key password",
    "mongodb://u:QZ10%40x@127.0.0.1:1/db?serverSelectionTimeoutMS=300"
    "&tlsCertificateKeyFilePassword=QZ11": "MongoDB TLS key password",
    "amqp://guest:QZ12#x@127.0.0.1:1//": "raw # in the password",
    "amqp://guest:QZ13@127.0.0.1:5672//": "RabbitMQ refuses the login",
    "sqla+postgresql+psycopg://u:QZ14?x@127.0.0.1:1/db": "raw ? in the password",
    "sqla+mysql+pymysql://root:QZ15@127.0.0.1:3306/test": "MariaDB refuses the login",
    "db+postgresql+psycopg://u:QZ16@127.0.0.1:1/db?connect_timeout=1": "PostgreSQL unreachable",
    "cache+memcached://u:QZ17@127.0.0.1:1/": "credentials memcached cannot use",
    "redis://:QZ18@127.0.0.1:6379/9?passwrd=QZ19": "a secret key misspelt, still secret",
    "redis://:QZ23@127.0.0.1:6379/9?socket_timeout=soon": "a bad value next to a password",
    "amqp://u%40x:QZ26@127.0.0.1:1//?heartbeat=x&password=QZ28": "amqp options",
    "sqla+postgresql+psycopg://u:QZ29@127.0.0.1:1/db?password=QZ30&sslpassword=QZ31": "dsn",
    "db+mysql+pymysql://u:QZ32@127.0.0.1:1/db?ssl_key_password=QZ33": "mysql unreachable",
    "rpc://u:QZ34@127.0.0.1:1//": "rpc without a broker",
    "mongodb://u:QZ35@127.0.0.1:1,127.0.0.2:2/db?serverSelectionTimeoutMS=300"
    "&authMechanismProperties=AWS_SESSION_TOKEN:QZ36": "AWS",
}


def _run(argv: list[str], env: dict[str, str], cwd: Path, timeout: float = 60) -> str:
    done = subprocess.run(
        argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False,
        errors="replace",
    )  # fmt: skip
    return f"[exit {done.returncode}]\n{done.stdout}{done.stderr}"


def _assert_no_marker(text: str, where: str) -> None:
    found = MARK.search(text)
    if found:
        at = found.start()
        raise AssertionError(
            f"secret {found.group()} leaked in {where}: {text[max(0, at - 150) : at]!r}"
        )


def test_conveyor_check_prints_no_secret_on_any_error_path(tmp_path: Path) -> None:
    env = cli_env()
    with ThreadPoolExecutor(4) as pool:
        outputs = dict(
            zip(
                CHECK_URLS,
                pool.map(
                    lambda url: _run([*conveyor_cmd(), "check", url, "-n", "1"], env, tmp_path),
                    CHECK_URLS,
                ),
                strict=True,
            )
        )
    for url, text in outputs.items():
        assert not text.startswith("[exit 0]"), f"{CHECK_URLS[url]}: check passed?\n{text}"
        _assert_no_marker(text, f"conveyor check ({CHECK_URLS[url]})")
    figures(
        "5-secrets-check", "cli", bad_inputs=len(CHECK_URLS),
        secrets=sum(len(MARK.findall(u)) for u in CHECK_URLS), leaked=0,
    )  # fmt: skip


def test_a_misspelt_password_key_is_not_printed_by_check(tmp_path: Path) -> None:
    env = cli_env()
    for url in ("redis://127.0.0.1:6379/9?pasword=QZ40", "redis://127.0.0.1:6379/9?secrte=QZ41"):
        text = _run([*conveyor_cmd(), "check", url, "-n", "1"], env, tmp_path)
        assert not text.startswith("[exit 0]")
        _assert_no_marker(text, "conveyor check")
        assert "unknown option 'pas" in text or "unknown option 'sec" in text, text
        assert "?pasword=***" in text or "?secrte=***" in text, text


def test_check_gives_up_within_its_timeout_on_a_server_that_never_answers(
    tmp_path: Path,
) -> None:
    """A listening socket nobody accepts on: the kernel completes the TCP handshake, then
    nothing answers (a hung server, or a Sentinel behind a stuck proxy). Without a bound the
    Redis client waits forever; ``conveyor check --timeout 2`` must exit non-zero, saying so,
    long before the subprocess timeout (which fails the test if it hangs)."""
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(64)
    port = hole.getsockname()[1]
    closed = free_port()
    urls = {
        f"redis://:QZ70@127.0.0.1:{port}/0": "no answer",
        f"sentinel://:QZ71@127.0.0.1:{port}/0?master_name=m&sentinel_password=QZ72": "no answer",
        f"redis://:QZ73@127.0.0.1:{closed}/0": None,  # refused: fails fast, any message
    }
    env = cli_env()

    def check(url: str) -> str:
        argv = [*conveyor_cmd(), "check", url, "-n", "1", "--timeout", "2"]
        return _run(argv, env, tmp_path, timeout=90)

    try:
        with ThreadPoolExecutor(3) as pool:
            outputs = list(pool.map(check, urls))
    finally:
        hole.close()
    for (url, expected), text in zip(urls.items(), outputs, strict=True):
        assert not text.startswith("[exit 0]"), f"{mask_url(url)}: check passed?\n{text}"
        _assert_no_marker(text, f"conveyor check {mask_url(url)}")
        if expected:
            assert "no answer within 2s" in text, text


PASSWORD = "QZ50 p@ss:w/rd#?;&=%\t'\"x"
SIGNING_KEY = "QZ51-signing-key-0123456789abcdef"


def _private_redis(tmp_path: Path) -> tuple[subprocess.Popen[bytes], int]:
    exe = shutil.which("redis-server")
    if exe is None:
        requirement_missing("redis-server is not installed")
    port = free_port()
    server = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--requirepass", PASSWORD, "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    wait_port(port, 10)
    return server, port


def test_a_worker_and_the_cli_with_secrets_everywhere_print_none_of_them(tmp_path: Path) -> None:
    server, port = _private_redis(tmp_path)
    url = f"redis://:{quote(PASSWORD, safe='')}@127.0.0.1:{port}/0"
    runs = tmp_path / "runs"
    queue = unique_name("secrets")
    settings: dict[str, Any] = {
        "security_key": SIGNING_KEY,
        "task_default_queue": queue,
        "broker_transport_options": {
            "sentinel_password": "QZ52",
            "sentinel_kwargs": {"password": "QZ53", "api_key": "QZ54"},
        },
        "result_backend_transport_options": {"sentinel_password": "QZ55"},
    }
    base = {"HOSTILE_RUNS": str(runs), "HOSTILE_BROKER": url, "HOSTILE_BACKEND": url}
    env = cli_env(HOSTILE_SETTINGS=json.dumps(settings), **base)
    outputs: dict[str, str] = {}
    log = tmp_path / "worker.log"
    try:
        with log.open("wb") as sink:
            worker = subprocess.Popen(
                [*conveyor_cmd(), "-A", "hostile_support", "worker", "-l", "debug", "-P",
                 "threads", "-c", "2", "-Q", queue],
                env=env, cwd=tmp_path, stdout=sink, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        try:
            called = _run(
                [*conveyor_cmd(), "-A", "hostile_support", "call", "h.count", "--args",
                 "[5]", "--wait", "60"], env, tmp_path,
            )  # fmt: skip
            outputs["call"] = called
            assert called.strip().endswith("5"), called
            task_id = called.splitlines()[1].strip()
            outputs["result"] = _run(
                [*conveyor_cmd(), "-A", "hostile_support", "result", task_id], env, tmp_path
            )
            assert '"SUCCESS"' in outputs["result"], outputs["result"]
            outputs["check"] = _run([*conveyor_cmd(), "check", url, "-n", "2"], env, tmp_path)
            assert "p50 ms" in outputs["check"], outputs["check"]
            wrong = url.replace("QZ50", "QZ56")
            outputs["check-wrong-password"] = _run(
                [*conveyor_cmd(), "check", wrong, "-n", "1"], env, tmp_path
            )
        finally:
            worker.terminate()
            try:
                worker.wait(30)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait(10)
        outputs["worker"] = log.read_text(errors="replace")
        # Workers that cannot start, each for another reason.
        failing = {
            "wrong-password": {**base, "HOSTILE_BROKER": url.replace("QZ50", "QZ57")},
            "unreachable": {
                **base,
                "HOSTILE_BROKER": f"redis://:{quote(PASSWORD, safe='')}@127.0.0.1:1/0",
            },
            "amqp-refused": {**base, "HOSTILE_BROKER": AMQP_URL.replace("guest:guest", "u:QZ58")},
        }
        retry_once = {**settings, "broker_connection_max_retries": 1}
        bad_settings = {
            "unknown-secret-option": {
                **settings,
                "broker_transport_options": {"password": "QZ59", "token": "QZ60"},
            },
            "short-signing-key": {**settings, "security_key": "QZ61-short"},
            "signing-key-wrong-type": {**settings, "security_key": {"k": "QZ62-0123456789abcdef"}},
        }
        jobs = [
            (name, cli_env(HOSTILE_SETTINGS=json.dumps(retry_once), **values))
            for name, values in failing.items()
        ] + [
            (name, cli_env(HOSTILE_SETTINGS=json.dumps(values), **base))
            for name, values in bad_settings.items()
        ]
        argv = [*conveyor_cmd(), "-A", "hostile_support", "worker", "-l", "debug", "-Q", queue,
                "-P", "threads"]  # fmt: skip
        with ThreadPoolExecutor(4) as pool:
            for (name, _), text in zip(
                jobs, pool.map(lambda job: _run(argv, job[1], tmp_path, 90), jobs), strict=True
            ):
                outputs[f"worker-{name}"] = text
                assert not text.startswith("[exit 0]"), f"{name} started?\n{text[-2000:]}"
    finally:
        server.terminate()
        server.wait(10)
    assert "conveyor worker" in outputs["worker"]  # the banner, with the masked URL
    assert mask_url(url) in outputs["worker"]
    assert "QZ" not in mask_url(url)
    for where, text in outputs.items():
        no_secret(text, [PASSWORD, quote(PASSWORD, safe=""), quote(PASSWORD)], where)
        _assert_no_marker(text, where)
    figures(
        "5-secrets-cli", "redis", bad_inputs=len(outputs), leaked=0,
        bytes_searched=sum(len(t) for t in outputs.values()),
    )  # fmt: skip
