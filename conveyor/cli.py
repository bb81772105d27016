"""The ``conveyor`` command.

    conveyor -A tasks worker -Q q1,q2 -c 4 -P prefork -l info
    conveyor -A tasks call tasks.add --args '[2, 18]'
    conveyor -A tasks result <task-id>
    conveyor check redis://localhost:6379/0
    conveyor bench redis://127.0.0.1:6379/10
    conveyor demo

URLs are always printed with passwords masked, and so is every error text.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time
from typing import Any

import click

from conveyor.core.errors import ConveyorError
from conveyor.core.urls import mask_text, mask_url
from conveyor.runtime.command import LOG_FORMAT, setup_logging, worker

__all__ = ["LOG_FORMAT", "find_app", "main", "setup_logging"]


def find_app(spec: str) -> Any:
    """Import ``module`` or ``module:attr`` and return its App (``app`` or ``celery`` attr,
    else the only App instance in the module)."""
    from conveyor.runtime.app import App

    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    module_name, _, attr = spec.partition(":")
    module = importlib.import_module(module_name)
    if attr:
        obj = getattr(module, attr)
        if not isinstance(obj, App):
            raise click.UsageError(f"{spec} is not a conveyor App")
        return obj
    for name in ("app", "celery"):
        obj = getattr(module, name, None)
        if isinstance(obj, App):
            return obj
    apps = [v for v in vars(module).values() if isinstance(v, App)]
    if len(apps) == 1:
        return apps[0]
    raise click.UsageError(f"no App found in module {module_name!r}; use -A module:attribute")


class _Ctx:
    def __init__(self, app_spec: str | None) -> None:
        self.app_spec = app_spec
        self._app: Any = None

    @property
    def app(self) -> Any:
        if self._app is None:
            if not self.app_spec:
                raise click.UsageError("this command needs -A/--app MODULE")
            self._app = find_app(self.app_spec)
        return self._app


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-A", "--app", "app_spec", metavar="MODULE[:ATTR]", help="Where the App lives.")
@click.pass_context
def main(ctx: click.Context, app_spec: str | None) -> None:
    """conveyor: task queues on any broker, Celery-compatible."""
    if isinstance(ctx.obj, _Ctx):
        return
    preset = ctx.obj
    ctx.obj = _Ctx(app_spec)
    if preset is not None:  # app.worker_main() passes the App itself
        ctx.obj._app = preset


main.add_command(worker)


@main.command()
@click.argument("name")
@click.option("--args", "args_json", default="[]", help="JSON list of positional arguments.")
@click.option("--kwargs", "kwargs_json", default="{}", help="JSON map of keyword arguments.")
@click.option("-Q", "--queue", default=None)
@click.option("--countdown", type=float, default=None)
@click.option("--wait", "wait_s", type=float, default=None, help="Wait this long for the result.")
@click.pass_obj
def call(
    obj: _Ctx,
    name: str,
    args_json: str,
    kwargs_json: str,
    queue: str | None,
    countdown: float | None,
    wait_s: float | None,
) -> None:
    """Send task NAME and print its id (and its result with --wait)."""
    try:
        args = json.loads(args_json)
        kwargs = json.loads(kwargs_json)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not JSON: {exc}") from exc
    if not isinstance(args, list) or not isinstance(kwargs, dict):
        raise click.BadParameter("--args must be a JSON list and --kwargs a JSON object")
    app = obj.app
    try:
        result = app.send_task(name, args, kwargs, queue=queue, countdown=countdown)
        click.echo(result.id)
        if wait_s is not None:
            click.echo(json.dumps(result.get(timeout=wait_s, propagate=False), default=str))
    except ConveyorError as exc:
        raise click.ClickException(mask_text(str(exc))) from exc
    finally:
        app.close()


@main.command()
@click.argument("task_id")
@click.pass_obj
def result(obj: _Ctx, task_id: str) -> None:
    """Print the state and result of TASK_ID."""
    app = obj.app
    try:
        res = app.AsyncResult(task_id)
        out = {"id": task_id, "state": res.state, "result": res.result, "traceback": res.traceback}
        click.echo(json.dumps(out, default=repr, indent=2))
    except ConveyorError as exc:
        raise click.ClickException(mask_text(str(exc))) from exc
    finally:
        app.close()


@main.command()
@click.argument("url")
@click.option("--as", "kind", type=click.Choice(["auto", "broker", "backend"]), default="auto")
@click.option("-n", "--rounds", type=int, default=20, show_default=True)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0),
    default=10.0,
    show_default=True,
    help="Seconds the whole check may take (connect and every round trip); 0: no limit.",
)
def check(url: str, kind: str, rounds: int, timeout: float) -> None:
    """Connect to URL, run round trips, and report capabilities and latency.

    Exits non-zero when the store fails or does not answer within --timeout.
    """
    from conveyor.runtime.check import run_check

    try:
        rows, caps, what = run_check(url, kind=kind, rounds=rounds, timeout=timeout)
    except ConveyorError as exc:
        raise click.ClickException(f"{mask_url(url)}: {mask_text(str(exc))}") from exc
    click.echo(f"{what} {mask_url(url)}")
    click.echo(f"  capabilities: {', '.join(sorted(caps)) or '(none)'}")
    click.echo(f"  {'operation':<14} {'p50 ms':>9} {'p99 ms':>9} {'max ms':>9}")
    for op, p50, p99, worst in rows:
        click.echo(f"  {op:<14} {p50:>9.3f} {p99:>9.3f} {worst:>9.3f}")


def _bench_harness() -> Any:
    """``bench.harness`` from the checkout this conveyor runs from (or the current directory);
    exits 2 when there is none (an installed wheel ships no benchmark harness)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for where in (root, os.getcwd()):
        if os.path.isfile(os.path.join(where, "bench", "harness.py")):
            if where not in sys.path:
                sys.path.insert(0, where)
            break
    try:
        return importlib.import_module("bench.harness")
    except ImportError as exc:
        click.echo(
            f"conveyor bench: the benchmark harness is not importable ({exc}); it is the "
            "bench/ directory of conveyor's repository: run this from a checkout "
            "(or `make bench` there)",
            err=True,
        )
        raise SystemExit(2) from exc


@main.command()
@click.argument("url")
@click.option("--backend", default=None, help="Result backend URL (default: derived from URL).")
@click.option("-n", "--messages", type=int, default=10_000, show_default=True)
@click.option("--roundtrips", type=int, default=1_000, show_default=True)
@click.option("--runs", type=int, default=3, show_default=True, help="At least 3.")
@click.option("--quick", is_flag=True, help="2,000 messages, 200 round trips.")
@click.option("--no-celery", is_flag=True, help="Measure conveyor alone.")
def bench(
    url: str,
    backend: str | None,
    messages: int,
    roundtrips: int,
    runs: int,
    quick: bool,
    no_celery: bool,
) -> None:
    """Measure conveyor (and Celery, when installed) on the broker at URL: enqueue, drain,
    round trip, result store/fetch. Prints medians [min-max] and conveyor / Celery ratios.
    Needs a checkout of conveyor's repository (the harness is its bench/ directory)."""
    harness = _bench_harness()

    celery = not no_celery
    if celery:
        try:
            import celery as _celery  # noqa: F401
        except ImportError:
            click.echo("celery is not installed: measuring conveyor alone", err=True)
            celery = False
    settings = harness.Settings(
        messages=2_000 if quick else messages,
        roundtrips=200 if quick else roundtrips,
        records=500 if quick else 2_000,
        runs=max(3, runs),
        cap=10.0 if quick else 12.0,
        celery=celery,
        log=lambda text: click.echo(text, err=True),
    )
    pair = harness.default_pair(url, backend)
    try:
        figures = harness.run_pair(pair, settings)
    except ConveyorError as exc:
        raise click.ClickException(f"{mask_url(url)}: {mask_text(str(exc))}") from exc
    click.echo(harness.format_table(figures))


@main.command()
@click.option("-n", "--tasks", "count", type=int, default=200, show_default=True)
@click.option("-c", "--concurrency", type=int, default=4, show_default=True)
@click.option("--timeout", type=float, default=120.0, show_default=True)
def demo(count: int, concurrency: int, timeout: float) -> None:
    """Run a worker on the embedded SQLite default, send tasks, and print a summary."""
    from conveyor.runtime.demo import run_demo

    started = time.monotonic()
    ok = run_demo(count=count, concurrency=concurrency, timeout=timeout)
    click.echo(f"demo finished in {time.monotonic() - started:.1f}s")
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":  # pragma: no cover
    main()
