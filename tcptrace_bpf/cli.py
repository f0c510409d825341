"""Command line: a thin click layer over the library modules.  Errors are one line and a non-zero exit."""

from __future__ import annotations

import functools
import gc
import json
import os
import sys
from typing import IO, Any, Callable, Optional

import click
from rich.console import Console

from tcptrace_bpf import __version__
from tcptrace_bpf.filters import Filter, parse_addr, parse_port
from tcptrace_bpf.recording import RecordingError

GC_THRESHOLD = 50_000  # objects allocated between young-generation collections (Python's default: 700)


class _Port(click.ParamType):
    name = "port"

    def convert(self, value: Any, param: Optional[click.Parameter], ctx: Optional[click.Context]) -> int:
        try:
            return parse_port(str(value))
        except ValueError:
            self.fail(f"{value!r} is not a port number (1-65535)", param, ctx)


class _Addr(click.ParamType):
    name = "address"

    def convert(self, value: Any, param: Optional[click.Parameter], ctx: Optional[click.Context]) -> str:
        try:
            return parse_addr(str(value))
        except ValueError:
            self.fail(f"{value!r} is not an IPv4 or IPv6 address", param, ctx)


def filter_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """--pid --comm --port --lport --rport --addr -4/-6, collected into one Filter argument `flt`."""
    options = [
        click.option("--pid", type=click.IntRange(min=0), help="Only sockets owned by this process id."),
        click.option("--comm", help="Only sockets owned by a process with this command name."),
        click.option("--port", type=_Port(), help="Only sockets with this port at either end."),
        click.option("--lport", type=_Port(), help="Only sockets with this local port."),
        click.option("--rport", type=_Port(), help="Only sockets with this remote port."),
        click.option("--addr", type=_Addr(), help="Only sockets with this address at either end."),
        click.option("-4", "ipv4", is_flag=True, help="Only IPv4 (including IPv4-mapped IPv6)."),
        click.option("-6", "ipv6", is_flag=True, help="Only IPv6."),
    ]

    @functools.wraps(func)
    def wrapper(*args: Any, pid: Any, comm: Any, port: Any, lport: Any, rport: Any, addr: Any,
                ipv4: bool, ipv6: bool, **kwargs: Any) -> Any:
        if ipv4 and ipv6:
            raise click.UsageError("-4 and -6 exclude each other")
        family = 4 if ipv4 else (6 if ipv6 else None)
        flt = Filter(pid=pid, comm=comm, port=port, lport=lport, rport=rport, addr=addr, family=family)
        return func(*args, flt=flt, **kwargs)

    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper


@click.group(invoke_without_command=True)
@click.version_option(__version__, prog_name="tcptrace-bpf")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """Trace every TCP socket's life through the TCP states, with how long it spent in each.

    With no command: the live view on a terminal, `trace` when the output is not a terminal.
    """
    # Every command allocates a few small objects per event and keeps many long-lived ones (lifecycles held
    # through TIME_WAIT); almost none form cycles.  With the default threshold (700) the collector walks
    # that heap over and over: measured, 20% of the intake path's time at connection-storm rates.
    gc.set_threshold(GC_THRESHOLD, 20, 100)
    if ctx.invoked_subcommand is None:
        ctx.invoke(live if sys.stdout.isatty() else trace)


def _open_output(path: str) -> IO[str]:
    """A recording's file ('-': stdout), or one clear line saying why it cannot be written."""
    try:
        return sys.stdout if path == "-" else open(path, "w", buffering=1 << 16)
    except OSError as exc:
        raise click.ClickException(f"cannot write {path}: {exc.strerror}") from None


def _kernel_plan() -> Any:
    from tcptrace_bpf.plan import make_plan
    from tcptrace_bpf.probe import probe_kernel

    facts = probe_kernel()
    plan = make_plan(facts)
    if plan.fatal:
        first = next(p for p in plan.problems if p.fatal)
        raise click.ClickException(f"cannot trace: {first.what} (fix: {first.fix}); see `tcptrace-bpf doctor`")
    return facts, plan


def _run_tracer(sinks_for: Callable[[dict[int, str]], list[Any]], flt: Filter, duration: Optional[float]) -> None:
    from tcptrace_bpf.kernel import KernelSource, SourceError
    from tcptrace_bpf.tracer import Tracer, engine_for, header

    facts, plan = _kernel_plan()
    tracer = Tracer(KernelSource(plan), sinks_for(facts.rst_reasons), engine_for(plan))
    tracer.install_signal_handlers()
    try:
        tracer.run(header(plan, flt), duration=duration)
    except SourceError as exc:
        raise click.ClickException(str(exc)) from None
    except BrokenPipeError:
        # The reader went away (`record -o - | head`): stop quietly, as other Unix tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)


@cli.command()
@filter_options
@click.option("--record", "record_to", help="Also record to this JSON Lines file while watching.")
@click.option("--replay", type=click.Path(dir_okay=False, exists=True), help="Play a recording (no root needed).")
@click.option("--speed", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="Replay speed: 1 real time, 10 ten times faster, 0 as fast as possible.")
@click.option("--duration", type=click.FloatRange(min=0), help="Stop after this many seconds.")
def live(flt: Filter, record_to: Optional[str], replay: Optional[str], speed: float,
         duration: Optional[float]) -> None:
    """Full-screen live view: state counts with trends, open sockets, recent closes, diagnoses.

    Keys: s sort column, f filter by state, p pause, q quit (Ctrl-C also quits).
    """
    from tcptrace_bpf.live import LiveApp
    from tcptrace_bpf.recording import Recorder, RecordingError
    from tcptrace_bpf.tracer import engine_for

    console = Console(highlight=False)
    opened: list[Any] = []
    try:
        if replay:
            from tcptrace_bpf.replay import RecordingSource

            if record_to:
                raise click.UsageError("--record and --replay exclude each other")
            stream = open(replay, encoding="utf-8")
            opened.append(stream)
            source: Any = RecordingSource(stream, replay, speed)
            hooks = {"state": f"replay of {replay} at speed {speed:g}"}
            head: dict[str, Any] = {"replay": replay}
            reasons: dict[int, str] = {}
            engine = engine_for(source.meta.get("header") or {})
        else:
            from tcptrace_bpf.kernel import KernelSource
            from tcptrace_bpf.tracer import header

            facts, plan = _kernel_plan()
            source = KernelSource(plan)
            hooks, head, reasons = plan.hooks, header(plan, flt), facts.rst_reasons
            engine = engine_for(plan)
        extra: list[Any] = []
        if record_to:
            out = _open_output(record_to)
            opened.append(out)
            extra.append(Recorder(out, flt, reasons))
        app = LiveApp(source, flt, hooks, extra, engine=engine)
        footer = app.run(head, console, duration)
    except RecordingError as exc:
        raise click.ClickException(str(exc)) from None
    except Exception as exc:
        from tcptrace_bpf.kernel import SourceError

        if isinstance(exc, SourceError):
            raise click.ClickException(str(exc)) from None
        raise
    finally:
        for stream in opened:
            if stream is not sys.stdout:
                stream.close()
    click.echo(f"stopped ({footer.get('reason')}): {footer.get('events')} events, lost {footer.get('lost_events')}")


@cli.command()
@filter_options
@click.option("--duration", type=click.FloatRange(min=0), help="Stop after this many seconds.")
def trace(flt: Filter, duration: Optional[float]) -> None:
    """Print each socket lifetime as it ends: endpoints, owner, close kind, states with durations."""
    from tcptrace_bpf.text import TextSink

    _run_tracer(lambda _reasons: [TextSink(sys.stdout, flt)], flt, duration)


@cli.command()
@click.option("--output", "-o", required=True, help="JSON Lines file to write ('-' for stdout).")
@filter_options
@click.option("--duration", type=click.FloatRange(min=0), help="Stop after this many seconds.")
def record(output: str, flt: Filter, duration: Optional[float]) -> None:
    """Record every transition, retransmit, reset and socket lifetime to JSON Lines.

    The header line is written once every probe is attached; the footer (with lost events) on SIGINT,
    SIGTERM or --duration.
    """
    from tcptrace_bpf.recording import Recorder

    opened: list[Any] = []

    def sinks(reasons: dict[int, str]) -> list[Any]:
        # Opened only once the plan says tracing can work, so a refusal leaves no empty file behind.
        out = _open_output(output)
        opened.append(out)
        return [Recorder(out, flt, reasons)]

    try:
        _run_tracer(sinks, flt, duration)
    finally:
        for out in opened:
            if out is not sys.stdout:
                out.close()


@cli.command()
@click.argument("file", type=click.Path(dir_okay=False, allow_dash=True))
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@filter_options
def report(file: str, as_json: bool, flt: Filter) -> None:
    """Report on a recording: time per state (p50/p90/p99/max), close kinds, stuck sockets."""
    from tcptrace_bpf.report import build_report, render

    try:
        stream = sys.stdin if file == "-" else open(file, encoding="utf-8", errors="strict")
    except OSError as exc:
        raise click.ClickException(f"cannot read {file}: {exc.strerror}") from None
    try:
        with stream:
            result = build_report(stream, file, flt)
    except RecordingError as exc:
        raise click.ClickException(str(exc)) from None
    except UnicodeDecodeError as exc:
        raise click.ClickException(f"{file}: not UTF-8 text ({exc.reason})") from None
    if as_json:
        click.echo(json.dumps(result.as_dict(), indent=2))
    else:
        # Piped output keeps whole rows (rich would otherwise assume 80 columns and cut them).
        render(result, Console(highlight=False, width=None if sys.stdout.isatty() else 200))


@cli.command()
def doctor() -> None:
    """Show the hook plan for this kernel and every problem with its fix (exit 1 if tracing cannot work)."""
    from tcptrace_bpf.doctor import render
    from tcptrace_bpf.plan import make_plan
    from tcptrace_bpf.probe import probe_kernel

    facts = probe_kernel()
    plan = make_plan(facts)
    loaded: Optional[str] = None
    if not plan.fatal:
        # Load for real: only the kernel can say whether it accepts a program (fentry may be refused).
        from tcptrace_bpf.kernel import KernelSource, SourceError

        source = KernelSource(plan)
        try:
            source.start()
            plan, loaded = source.plan, "ok: every program loaded and attached"
        except SourceError as exc:
            loaded = f"FAILED: {exc.why}"
        finally:
            source.close()
    render(facts, plan, Console(highlight=False, soft_wrap=True), loaded)
    if plan.fatal or (loaded or "").startswith("FAILED"):
        sys.exit(1)
