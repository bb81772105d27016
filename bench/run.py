"""conveyor against Celery 5.7, side by side on the same loopback servers (``make bench``).

Usage::

    .venv/bin/python -m bench.run [--quick] [--only redis,amqp] [--runs 3] [--no-plot]

For each backend pair (``redis`` -> redis, ``amqp`` -> rpc (drain results in Redis),
``sqlite`` -> sqlite, ``postgres`` -> postgres, ``mongodb`` -> mongodb) it runs
:func:`bench.harness.run_pair` (enqueue, drain, round trip, result store/fetch), then
worker memory (idle, and after 100,000 delayed tasks are queued) and the raw client limits
(redis-py pipelined LPUSH, ``redis-benchmark -P 100``, pika with and without confirms). It
prints one Markdown table of medians [min-max] and conveyor / Celery ratios, checks the
targets of issue 9, and writes ``bench/results/<time>.json``, ``bench/results/latest.md``
and ``bench/results/bench.png``.

Servers: ``CONVEYOR_BENCH_<NAME>_URL`` overrides a broker URL (loopback defaults below).
Redis uses databases 10 (brokers) and 11 (results), flushed before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from bench.harness import (
    Figure,
    Pair,
    Settings,
    format_table,
    rss_kib,
    run_pair,
    start_worker,
    stop_process,
)

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"

REDIS = os.environ.get("CONVEYOR_BENCH_REDIS_URL", "redis://127.0.0.1:6379/10")
REDIS_RESULTS = REDIS.rsplit("/", 1)[0] + "/11"
AMQP = os.environ.get("CONVEYOR_BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")
PG = os.environ.get("CONVEYOR_BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432")
MONGO = os.environ.get("CONVEYOR_BENCH_MONGODB_URL", "mongodb://127.0.0.1:27017")
ALL = ("redis", "amqp", "sqlite", "postgres", "mongodb")


def pairs(workdir: Path) -> dict[str, Pair]:
    """The backend pairs. SQL and MongoDB give each library its own database, so conveyor's
    and kombu's tables (both may be called ``celery_taskmeta``) never meet."""
    sq = workdir / "sqlite"
    return {
        "redis": Pair("redis", REDIS, REDIS_RESULTS, REDIS, REDIS_RESULTS, threads=True),
        "amqp": Pair(
            "amqp",
            AMQP,
            "rpc://",
            AMQP,
            "rpc://",
            drain_backend=REDIS_RESULTS,
            celery_drain_backend=REDIS_RESULTS,
            threads=True,
        ),
        "sqlite": Pair(
            "sqlite",
            f"sqla+sqlite:///{sq}/conveyor-broker.db",
            f"db+sqlite:///{sq}/conveyor-results.db",
            f"sqla+sqlite:///{sq}/celery-broker.db",
            f"db+sqlite:///{sq}/celery-results.db",
        ),
        "postgres": Pair(
            "postgres",
            f"sqla+{PG}/bench_conveyor",
            f"db+{PG}/bench_conveyor",
            f"sqla+{PG}/bench_celery",
            f"db+{PG}/bench_celery",
        ),
        "mongodb": Pair(
            "mongodb",
            f"{MONGO}/bench_conveyor",
            f"{MONGO}/bench_conveyor",
            f"{MONGO}/bench_celery",
            f"{MONGO}/bench_celery",
            slow=True,
        ),
    }


def log(text: str) -> None:
    print(text, flush=True)


# ============================================================================ setup / cleanup


def flush_redis() -> None:
    import redis

    for url in (REDIS, REDIS_RESULTS):
        client = redis.Redis.from_url(url)
        client.flushdb()
        client.close()


def postgres_databases(create: bool) -> None:
    """Create (or drop) the bench databases on the PostgreSQL server."""
    import psycopg

    with psycopg.connect(PG.replace("+psycopg", "") + "/postgres", autocommit=True) as conn:
        for name in ("bench_conveyor", "bench_celery"):
            exists = conn.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (name,)
            ).fetchone()
            if create and not exists:
                conn.execute(f'CREATE DATABASE "{name}"')
            elif not create and exists:
                conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


def mongo_drop() -> None:
    import pymongo

    client: Any = pymongo.MongoClient(MONGO, serverSelectionTimeoutMS=5000)
    try:
        for name in ("bench_conveyor", "bench_celery"):
            client.drop_database(name)
    finally:
        client.close()


# ============================================================================ memory


def _wait_ready(app: Any, queue: str, lib: str, timeout: float = 60.0) -> None:
    result = app.send_task("bench.add", (1, 1), queue=queue)
    if lib == "conveyor":
        result.get(timeout=timeout)
    else:
        result.get(timeout=timeout)


def measure_rss(settings: Settings, delayed: int, include_amqp: bool) -> list[Figure]:
    """Idle RSS of solo and prefork (-c 2, children included) workers, and solo RSS after
    ``delayed`` tasks with a one-hour countdown are queued for the worker."""
    from bench.harness import _make_celery_app, _make_conveyor_app

    rows = {
        "idle": Figure("worker RSS idle (solo)", "redis", "MiB", higher_is_better=False),
        "prefork": Figure(
            "worker RSS idle (prefork -c 2, incl. children)",
            "redis",
            "MiB",
            higher_is_better=False,
        ),
        "delayed": Figure(
            f"worker RSS after {delayed:,} delayed tasks (solo)",
            "redis",
            "MiB",
            higher_is_better=False,
            note="Celery keeps ETA tasks in worker memory; conveyor leaves them in Redis",
        ),
        "growth": Figure(
            f"worker RSS growth with {delayed:,} delayed tasks",
            "redis",
            "%",
            higher_is_better=False,
        ),
        "amqp": Figure(
            "worker RSS idle (solo)", "amqp", "MiB", higher_is_better=False, note="-> rpc"
        ),
    }
    for run in range(settings.runs):
        log(f"  [memory] run {run + 1}/{settings.runs}")
        for lib in ("conveyor", "celery"):
            target = rows["idle"].conveyor if lib == "conveyor" else rows["idle"].celery
            app = (
                _make_conveyor_app(REDIS, REDIS_RESULTS)
                if lib == "conveyor"
                else _make_celery_app(REDIS, REDIS_RESULTS)
            )
            filler = _make_conveyor_app(REDIS, "memory://")
            try:
                for pool, key in (("prefork", "prefork"), ("solo", "idle")):
                    queue = f"bench.{lib}.rss.{uuid.uuid4().hex[:8]}"
                    proc = start_worker(
                        lib,
                        queue,
                        REDIS,
                        REDIS_RESULTS,
                        results=True,
                        pool=pool,
                        concurrency=2,
                    )
                    try:
                        _wait_ready(app, queue, lib)
                        time.sleep(2.0)
                        idle = rss_kib(proc.pid) / 1024
                        fig = rows[key]
                        (fig.conveyor if lib == "conveyor" else fig.celery).append(idle)
                        log(f"    {lib} {pool} idle: {idle:.1f} MiB")
                        if pool != "solo":
                            continue
                        target = (
                            rows["delayed"].conveyor
                            if lib == "conveyor"
                            else rows["delayed"].celery
                        )
                        # Setup: the same Celery messages either way (conveyor's publisher is
                        # the fast one); a Celery worker gets them ready (ETA in the header),
                        # a conveyor worker's queue keeps them in the delayed set.
                        filler.send_many(
                            "bench.add",
                            ((i, i) for i in range(delayed)),
                            queue=queue,
                            countdown=3600.0,
                        )
                        deadline = time.monotonic() + 45.0
                        while time.monotonic() < deadline and filler.broker.size(queue) > 0:
                            time.sleep(0.2)
                        time.sleep(3.0)
                        loaded = rss_kib(proc.pid) / 1024
                        target.append(loaded)
                        growth = (
                            rows["growth"].conveyor if lib == "conveyor" else rows["growth"].celery
                        )
                        growth.append(100.0 * (loaded - idle) / idle)
                        log(f"    {lib} solo after {delayed:,} delayed: {loaded:.1f} MiB")
                    finally:
                        stop_process(proc, timeout=30.0)
                        filler.broker.purge(queue)
            finally:
                filler.close()
                app.close()
            if include_amqp:
                amqp_idle = _idle_rss(lib, AMQP, "rpc://")
                getattr(rows["amqp"], lib).append(amqp_idle)
                log(f"    {lib} solo idle on RabbitMQ: {amqp_idle:.1f} MiB")
    return [f for f in rows.values() if f.conveyor or f.celery]


def _idle_rss(lib: str, broker: str, backend: str) -> float:
    from bench.harness import _make_celery_app, _make_conveyor_app

    app = (
        _make_conveyor_app(broker, backend)
        if lib == "conveyor"
        else _make_celery_app(broker, backend)
    )
    queue = f"bench.{lib}.rss.{uuid.uuid4().hex[:8]}"
    proc = start_worker(lib, queue, broker, backend, results=True)
    try:
        _wait_ready(app, queue, lib)
        time.sleep(2.0)
        return rss_kib(proc.pid) / 1024
    finally:
        stop_process(proc, timeout=30.0)
        if lib == "conveyor":
            app.broker.purge(queue)
            delete = getattr(app.broker, "delete_queue", None)
            if delete is not None:
                delete(queue)
        app.close()


# ============================================================================ raw limits


def raw_limits(settings: Settings, envelope_size: int) -> list[Figure]:
    """What the servers allow from one client: context for the enqueue figures."""
    import redis

    n = settings.messages * 10
    payload = b"x" * envelope_size
    rows: list[Figure] = []
    lpush = Figure("raw redis-py pipelined LPUSH (1,000/pipeline)", "redis", "msg/s")
    client = redis.Redis.from_url(REDIS)
    for _ in range(settings.runs):
        key = f"bench.raw.{uuid.uuid4().hex[:8]}"
        started = time.perf_counter()
        for start in range(0, n, 1000):
            pipe = client.pipeline(transaction=False)
            for _ in range(min(1000, n - start)):
                pipe.lpush(key, payload)
            pipe.execute()
        lpush.conveyor.append(n / (time.perf_counter() - started))
        client.delete(key)
    client.close()
    lpush.note = f"{envelope_size}-byte values (a conveyor task message)"
    rows.append(lpush)
    if shutil.which("redis-benchmark"):
        host, port = "127.0.0.1", "6379"
        for size in (3, envelope_size):
            fig = Figure(f"raw redis-benchmark LPUSH -P 100 -d {size}", "redis", "msg/s")
            for _ in range(settings.runs):
                cmd = ["redis-benchmark", "-h", host, "-p", port, "--dbnum", "10", "-t", "lpush"]
                cmd += ["-n", str(n * 5), "-P", "100", "-d", str(size), "-q", "--csv"]
                out = subprocess.run(
                    cmd,
                    capture_output=True,
                    text=True,
                    timeout=120,
                    check=True,
                )
                for line in out.stdout.splitlines():
                    if line.startswith('"LPUSH"'):
                        fig.conveyor.append(float(line.split(",")[1].strip('"')))
            fig.note = "the server's own client, C"
            rows.append(fig)
        flush_redis()
    for label, confirms, count in (
        ("raw pika publish, no confirms", False, settings.messages),
        ("raw pika publish, confirm each", True, max(500, settings.messages // 5)),
    ):
        fig = Figure(label, "amqp", "msg/s", note="pika BlockingConnection, 1 thread")
        for _ in range(settings.runs):
            fig.conveyor.append(pika_rate(confirms, count))
        rows.append(fig)
    return rows


def pika_rate(confirms: bool, count: int) -> float:
    """Raw pika publish rate of ``count`` Celery task messages to a fresh durable queue."""
    from bench.amqp_publish import run_pika, task_envelope
    from conveyor.transports.amqp import AMQPBroker

    broker = AMQPBroker.from_url(AMQP)
    queue = f"bench.raw.{uuid.uuid4().hex[:8]}"
    try:
        broker.declare_queue(queue)
        envelopes = [task_envelope(i) for i in range(count)]
        return run_pika(AMQP, queue, envelopes, confirms=confirms)
    finally:
        broker.delete_queue(queue)
        broker.close()


# ============================================================================ targets


def _find(figures: list[Figure], backend: str, metric: str) -> Figure | None:
    for f in figures:
        if f.backend == backend and f.metric.startswith(metric):
            return f
    return None


def _median(values: list[float]) -> float | None:
    st = Figure.stats(values)
    return None if st is None else st[0]


def targets(figures: list[Figure]) -> list[tuple[str, str, bool | None]]:
    """(target, measured, met) for each target of issue 9 that this run measured."""
    out: list[tuple[str, str, bool | None]] = []

    def ratio(backend: str, metric: str, want: float, label: str) -> None:
        f = _find(figures, backend, metric)
        if f is None or f.ratio is None:
            return
        out.append((label, f"{f.ratio:.2f}x ({metric}, {backend})", f.ratio >= want))

    ratio("redis", "enqueue delay() x1", 4.0, "enqueue >= 4x Celery on Redis (1 thread)")
    # RabbitMQ: conveyor's confirmed publishing shares confirms between threads or waits once
    # per batch; compare its better mode with Celery's better mode (Celery: no confirms).
    mine = [
        (f.metric, _median(f.conveyor) or 0.0)
        for f in figures
        if f.backend == "amqp" and f.metric.startswith(("enqueue delay() x8", "enqueue send_many"))
    ]
    theirs = [
        (f.metric, _median(f.celery) or 0.0)
        for f in figures
        if f.backend == "amqp" and f.metric.startswith("enqueue") and f.celery
    ]
    if mine and theirs:
        best_mine, best_theirs = max(mine, key=lambda m: m[1]), max(theirs, key=lambda m: m[1])
        if best_theirs[1]:
            r = best_mine[1] / best_theirs[1]
            out.append(
                (
                    "enqueue >= 3x Celery on RabbitMQ (conveyor with confirms)",
                    f"{r:.2f}x (conveyor {best_mine[0]} / Celery {best_theirs[0]})",
                    r >= 3.0,
                )
            )
    for backend in ("redis", "amqp", "sqlite", "postgres"):
        ratio(backend, "drain solo, no results", 3.0, f"solo drain >= 3x Celery ({backend})")
        ratio(backend, "drain solo, results", 3.0, f"solo drain with results >= 3x ({backend})")
    for backend in ("redis", "amqp", "sqlite", "postgres"):
        f = _find(figures, backend, "round trip p50")
        if f is not None and f.ratio is not None:
            out.append(
                (
                    f"round trip p50 <= 1/3 of Celery's ({backend})",
                    f"{f.ratio:.2f} of Celery's",
                    f.ratio <= 1 / 3,
                )
            )
    batch = _find(figures, "redis", "enqueue send_many")
    bench = _find(figures, "redis", "raw redis-benchmark LPUSH -P 100 -d 3")
    bench_sized = next(
        (
            f
            for f in figures
            if f.metric.startswith("raw redis-benchmark") and not f.metric.endswith("-d 3")
        ),
        None,
    )
    if batch is not None and bench is not None:
        mine, theirs = _median(batch.conveyor), _median(bench.conveyor)
        if mine and theirs:
            sized = _median(bench_sized.conveyor) if bench_sized else None
            extra = f"; {mine / sized:.2f} of it with task-sized values" if sized else ""
            out.append(
                (
                    "send_many >= 1/2 of redis-benchmark LPUSH -P 100",
                    f"{mine / theirs:.3f} of it{extra}",
                    mine >= theirs / 2,
                )
            )
    idle = _find(figures, "redis", "worker RSS idle (solo)")
    if idle is not None and idle.ratio is not None:
        out.append(("idle worker RSS <= 1/2 Celery's", f"{idle.ratio:.2f}", idle.ratio <= 0.5))
    growth = _find(figures, "redis", "worker RSS growth")
    if growth is not None and growth.conveyor:
        worst = max(growth.conveyor)
        out.append(("worker RSS flat (<10%) with 100k delayed", f"{worst:+.1f}% worst", worst < 10))
    return out


# ============================================================================ plot


def plot_from_json(source: Path, path: Path) -> None:
    data = json.loads(source.read_text())
    figures = [
        Figure(d["metric"], d["backend"], d["unit"], d["conveyor"], d["celery"])
        for d in data["figures"]
    ]
    plot(figures, path)


def plot(figures: list[Figure], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = [
        f
        for f in figures
        if f.unit == "msg/s" and f.celery and f.conveyor and not f.metric.startswith("raw")
    ]
    lat = [f for f in figures if f.metric == "round trip p50" and f.celery and f.conveyor]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(15, 6.5), gridspec_kw={"width_ratios": [3, 1]})
    labels = [f"{f.backend}\n{f.metric.replace(', ', chr(10))}" for f in rates]
    xs = range(len(rates))
    for offset, lib, color in ((-0.2, "conveyor", "#1f77b4"), (0.2, "Celery 5.7", "#aaaaaa")):
        vals = [_median(f.conveyor if lib == "conveyor" else f.celery) or 0 for f in rates]
        ax1.bar([x + offset for x in xs], vals, width=0.4, label=lib, color=color)
    ax1.set_yscale("log")
    ax1.set_xticks(list(xs), labels, fontsize=6.5, rotation=90)
    ax1.set_ylabel("messages per second (median, log scale)")
    ax1.set_title("Throughput (higher is better)")
    ax1.legend()
    lxs = range(len(lat))
    for offset, lib, color in ((-0.2, "conveyor", "#1f77b4"), (0.2, "Celery 5.7", "#aaaaaa")):
        vals = [_median(f.conveyor if lib == "conveyor" else f.celery) or 0 for f in lat]
        ax2.bar([x + offset for x in lxs], vals, width=0.4, label=lib, color=color)
    ax2.set_yscale("log")
    ax2.set_xticks(list(lxs), [f.backend for f in lat], fontsize=8)
    ax2.set_ylabel("ms (median of run p50s, log scale)")
    ax2.set_title("Round trip delay().get() p50 (lower is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ============================================================================ main


def envelope_size() -> int:
    from conveyor.core.celery import TaskMessage, build_envelope
    from conveyor.transports.redis import encode_envelope

    env = build_envelope(TaskMessage(task="bench.add", id=str(uuid.uuid4()), args=(1, 1)))
    return len(encode_envelope(env, "bench.queue", 9))


def report_from_json(path: Path) -> str:
    """The table and targets of a saved run (``--report bench/results/<time>.json``)."""
    data = json.loads(path.read_text())
    figures = [
        Figure(
            d["metric"],
            d["backend"],
            d["unit"],
            d["conveyor"],
            d["celery"],
            d["higher_is_better"],
            d["note"],
        )
        for d in data["figures"]
    ]
    lines = [format_table(figures), "", "| target | measured | met |", "|---|---|---|"]
    for label, measured, met in targets(figures):
        lines.append(f"| {label} | {measured} | {'yes' if met else 'NO'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer messages (a smoke run)")
    parser.add_argument("--only", default=",".join(ALL), help="comma-separated: " + ",".join(ALL))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--no-memory", action="store_true", help="skip the worker RSS runs")
    parser.add_argument("--no-raw", action="store_true", help="skip the raw client limits")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--report", type=Path, help="print the table of a saved JSON run")
    args = parser.parse_args(argv)
    if args.report:
        print(report_from_json(args.report))
        if not args.no_plot:
            plot_from_json(args.report, RESULTS / "bench.png")
        return 0
    only = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = set(only) - set(ALL)
    if unknown:
        parser.error(f"unknown backend(s) {sorted(unknown)}; choose from {', '.join(ALL)}")
    settings = Settings(runs=max(3, args.runs), log=log)
    delayed = 100_000
    if args.quick:
        settings = Settings(messages=2_000, roundtrips=200, records=500, runs=3, cap=15.0, log=log)
        delayed = 20_000
    RESULTS.mkdir(parents=True, exist_ok=True)
    workdir = RESULTS / "work"
    shutil.rmtree(workdir, ignore_errors=True)
    (workdir / "sqlite").mkdir(parents=True)
    started = time.monotonic()
    load_at_start = os.getloadavg()
    log(f"load average at start: {load_at_start[0]:.1f} (2 cores: above 2, the machine is busy)")
    figures: list[Figure] = []
    all_pairs = pairs(workdir)
    uses_redis = any(n in only for n in ("redis", "amqp"))
    interrupted = False
    # SIGTERM (e.g. from `timeout`) stops like Ctrl-C: workers stopped, queues cleaned, and
    # the figures measured so far still reported.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        if uses_redis:
            flush_redis()
        if "postgres" in only:
            postgres_databases(create=True)
        if "mongodb" in only:
            mongo_drop()
        for name in only:
            t0 = time.monotonic()
            log(f"== {name}")
            figures += run_pair(all_pairs[name], settings)
            log(f"== {name} took {time.monotonic() - t0:.0f}s")
        if "redis" in only and not args.no_memory:
            t0 = time.monotonic()
            log("== worker memory")
            figures += measure_rss(settings, delayed, "amqp" in only)
            log(f"== worker memory took {time.monotonic() - t0:.0f}s")
        if "redis" in only and "amqp" in only and not args.no_raw:
            t0 = time.monotonic()
            log("== raw client limits")
            figures += raw_limits(settings, envelope_size())
            log(f"== raw limits took {time.monotonic() - t0:.0f}s")
    except KeyboardInterrupt:
        interrupted = True
        log("== interrupted: reporting what was measured so far")
    finally:
        if uses_redis:
            flush_redis()
        if "postgres" in only:
            postgres_databases(create=False)
        if "mongodb" in only:
            mongo_drop()
        shutil.rmtree(workdir, ignore_errors=True)
    elapsed = time.monotonic() - started
    table = format_table(figures)
    checks = targets(figures)
    lines = [table, "", "| target | measured | met |", "|---|---|---|"]
    for label, measured, met in checks:
        lines.append(f"| {label} | {measured} | {'yes' if met else 'NO'} |")
    load_end = os.getloadavg()[0]
    lines += [
        "",
        f"total bench time: {elapsed:.0f} s ({'quick' if args.quick else 'full'}); load average "
        f"{load_at_start[0]:.1f} at start, {load_end:.1f} at end ({os.cpu_count()} CPUs)"
        + (" - INTERRUPTED, partial" if interrupted else ""),
    ]
    report = "\n".join(lines)
    print()
    print(report)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    payload = {
        "when": stamp,
        "quick": args.quick,
        "only": only,
        "seconds": elapsed,
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
        "loadavg_at_start": load_at_start,
        "loadavg_at_end": os.getloadavg(),
        "figures": [f.as_dict() for f in figures],
        "targets": [{"target": t, "measured": m, "met": ok} for t, m, ok in checks],
    }
    (RESULTS / f"{stamp}.json").write_text(json.dumps(payload, indent=2))
    (RESULTS / "latest.md").write_text(report + "\n")
    if not args.no_plot:
        plot(figures, RESULTS / "bench.png")
        log(f"plot: {RESULTS / 'bench.png'}")
    return 1 if interrupted else 0


if __name__ == "__main__":
    raise SystemExit(main())
