"""The worker's command line: ``conveyor worker`` and :meth:`App.worker_main
<conveyor.runtime.app.App.worker_main>`.

The ``worker`` command is defined here, in the runtime, and :mod:`conveyor.cli` adds it to
the ``conveyor`` group: the CLI depends on the runtime, never the reverse. The command finds
its app as ``ctx.obj.app`` (the CLI's lazily imported ``-A`` app, or the App running
``worker_main``).

Thread-safety: the command blocks the calling thread until the worker stops; run it from the
main thread so that it handles SIGTERM/SIGINT.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable
from typing import TYPE_CHECKING, Protocol

import click

from conveyor.core.errors import ConveyorError
from conveyor.core.urls import mask_text

if TYPE_CHECKING:
    from conveyor.runtime.app import App

__all__ = ["LOG_FORMAT", "AppSource", "setup_logging", "worker", "worker_main"]


class AppSource(Protocol):
    """What the ``worker`` command reads its app from (``ctx.obj``)."""

    @property
    def app(self) -> App: ...


LOG_FORMAT = "[%(asctime)s: %(levelname)s/%(processName)s] %(name)s: %(message)s"


def setup_logging(level: str) -> None:
    """Log to stderr at ``level`` (debug, info, warning, error) with Celery's line shape."""
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise click.BadParameter(f"unknown log level {level!r}", param_hint="-l/--loglevel")
    logging.basicConfig(level=numeric, format=LOG_FORMAT, stream=sys.stderr, force=True)


@click.command("worker", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-Q", "--queues", default=None, help="Comma-separated queues to consume.")
@click.option("-c", "--concurrency", type=int, default=None, help="Tasks run at once.")
@click.option("-P", "--pool", type=click.Choice(["prefork", "threads", "solo"]), default=None)
@click.option("-l", "--loglevel", default="warning", show_default=True)
@click.option("-n", "--hostname", default=None, help="Node name (default conveyor@<host>).")
@click.option("--prefetch-multiplier", type=int, default=None)
@click.option(
    "--time-limit",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Hard time limit in seconds for tasks without their own (task_time_limit).",
)
@click.option(
    "--soft-time-limit",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Soft time limit in seconds for tasks without their own (task_soft_time_limit).",
)
@click.pass_obj
def worker(
    obj: AppSource,
    queues: str | None,
    concurrency: int | None,
    pool: str | None,
    loglevel: str,
    hostname: str | None,
    prefetch_multiplier: int | None,
    time_limit: float | None,
    soft_time_limit: float | None,
) -> None:
    """Consume queues and run tasks until SIGTERM (warm) or a second signal (cold).

    With the prefork pool, children ignore SIGTERM and SIGINT: a signal to the whole process
    group (systemd's default KillMode, Ctrl-C) is the parent's to act on, so it is a warm
    shutdown like a signal to the worker alone.
    """
    setup_logging(loglevel)
    app = obj.app
    if time_limit is not None:
        app.conf.task_time_limit = time_limit
    if soft_time_limit is not None:
        app.conf.task_soft_time_limit = soft_time_limit
    w = app.Worker(
        queues=[q.strip() for q in queues.split(",") if q.strip()] if queues else None,
        concurrency=concurrency,
        pool=pool,
        hostname=hostname,
        prefetch_multiplier=prefetch_multiplier,
    )
    click.echo(w.banner(), err=True)
    if app.uses_embedded_default:
        click.echo(
            "  note: no broker configured; using the embedded SQLite default. Set "
            "CONVEYOR_BROKER_URL (or broker=...) for anything beyond one machine.",
            err=True,
        )
    try:
        w.start()
    except ConveyorError as exc:
        raise click.ClickException(mask_text(str(exc))) from exc
    finally:
        app.close()


class _Given:
    """``ctx.obj`` for :func:`worker_main`: the app is already known."""

    def __init__(self, app: App) -> None:
        self.app = app


def worker_main(app: App, argv: Iterable[str] | None = None) -> None:
    """Run the ``worker`` command for ``app``: ``argv`` as on the command line after
    ``conveyor``, e.g. ``["worker", "-l", "info"]`` (the leading ``worker`` may be left out).
    Like the command line, exits the process when the worker stops."""
    args = list(argv or ["worker"])
    if args[:1] == ["worker"]:
        args = args[1:]
    worker.main(args=args, obj=_Given(app), prog_name="conveyor worker")
