"""The `redirect-audit` command line (contract in design.md)."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import click
import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

from analyzer import exports
from analyzer.analysis import AnalysisOptions, analyze
from analyzer.demo_store import DEMO_DB, build_demo_store
from analyzer.chains import DEFAULT_LINK_WINDOW, LinkOptions
from analyzer.detectors import RULES, DetectorOptions
from analyzer.detectors.base import DEFAULT_DUPLICATE_WINDOW, DEFAULT_MAX_REDIRECTS, DEFAULT_STALE_AFTER_DAYS
from analyzer.ingest import CaptureOptions, ImportError_, import_har
from analyzer.ingest.common import DEFAULT_BODY_CAP
from analyzer.model import Severity
from analyzer.report import (
    chain_records,
    finding_records,
    print_chain_trees,
    print_conformance_table,
    print_findings_table,
    write_json,
    write_jsonl,
)
from analyzer.store import DB_ENV, Store, StoreError, open_store, resolve_db_url

EXIT_ERROR = 2
EXIT_FINDINGS = 1

app = typer.Typer(
    name="redirect-audit",
    help="Rebuild HTTP redirect chains from captures and say which hop went wrong, why, and how to fix it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True)

DbOption = Annotated[
    str | None,
    typer.Option("--db", help=f"SQLAlchemy URL or SQLite path [default: ${DB_ENV}, else ./redirect-audit.db]"),
]


class FindingFormat(StrEnum):
    table = "table"
    json = "json"
    jsonl = "jsonl"
    sarif = "sarif"
    junit = "junit"
    markdown = "markdown"
    html = "html"


class ChainFormat(StrEnum):
    tree = "tree"
    json = "json"


class UserError(Exception):
    """Reported as one line, exit status 2."""


@app.command("import-har")
def import_har_cmd(
    files: Annotated[list[Path], typer.Argument(help="HAR files (1.1 or 1.2)", show_default=False)],
    db: DbOption = None,
    keep_bodies: Annotated[bool, typer.Option(help="Also store request/response bodies (capped, secret fields redacted)")] = False,
    body_cap: Annotated[int, typer.Option(help="Bytes kept per body with --keep-bodies")] = DEFAULT_BODY_CAP,
    workers: Annotated[int | None, typer.Option(
        help="Processes converting entries (default: one per CPU, at most 4, for files over 16 MB; 0: none)",
        show_default=False, min=0)] = None,
) -> None:
    """Import HAR files; each file is one transaction, a bad file leaves nothing behind."""
    store = _open(db)
    options = CaptureOptions(keep_bodies=keep_bodies, body_cap=body_cap)
    _import_files(files, lambda path: _import_one(store, path, options, workers), "entries")


def _import_files(files: list[Path], import_one, noun: str) -> None:
    """Import each file in turn; a bad one is reported in one line and the others still go in."""
    failed = 0
    for path in files:
        try:
            result = import_one(path)
        except ImportError_ as exc:
            _error(str(exc))
            failed += 1
            continue
        note = f", {result.warnings} field(s) unreadable and left empty" if result.warnings else ""
        click.echo(f"imported {result.entries} {noun} from {path}{note}")
    if failed:
        raise typer.Exit(EXIT_ERROR)


def _import_one(store: Store, path: Path, options: CaptureOptions, workers: int | None):
    if not sys.stderr.isatty():
        return import_har(store, path, options, workers=workers)
    columns = ("[progress.description]{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
               TimeRemainingColumn())
    # No refresh thread: the importer may fork its workers, which wants a single thread.
    with Progress(*columns, console=err, transient=True, auto_refresh=False) as bar:
        size = path.stat().st_size if path.exists() else None
        task = bar.add_task(path.name, total=size)
        shown = [0.0]

        def advance(n: int) -> None:
            bar.advance(task, n)
            now = time.monotonic()
            if now - shown[0] > 0.1:
                shown[0] = now
                bar.refresh()

        return import_har(store, path, options, progress=advance, workers=workers)


@app.command("import-flows")
def import_flows_cmd(
    files: Annotated[list[Path], typer.Argument(help="Files saved by mitmdump -w or mitmweb", show_default=False)],
    db: DbOption = None,
    keep_bodies: Annotated[bool, typer.Option(help="Also store request/response bodies (capped, secret fields redacted)")] = False,
    body_cap: Annotated[int, typer.Option(help="Bytes kept per body with --keep-bodies")] = DEFAULT_BODY_CAP,
) -> None:
    """Import saved mitmproxy flows; each file is one transaction, a bad file leaves nothing behind."""
    from analyzer.ingest.flows import import_flows  # the one module that needs mitmproxy

    store = _open(db)
    options = CaptureOptions(keep_bodies=keep_bodies, body_cap=body_cap)
    _import_files(files, lambda path: import_flows(store, path, options), "flows")


@app.command("proxy", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def proxy_cmd(
    ctx: typer.Context,
    db: DbOption = None,
    listen_host: Annotated[str, typer.Option(help="Address the proxy listens on")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", "-p", help="Port the proxy listens on")] = 8080,
    mode: Annotated[list[str] | None, typer.Option(
        "--mode", "-m", help="mitmproxy mode, repeatable (regular, reverse:URL, socks5, upstream:URL, ...)",
        show_default=False)] = None,
    web: Annotated[bool, typer.Option("--web", help="Run mitmweb (flows in a browser UI) instead of mitmdump")] = False,
    keep_bodies: Annotated[bool, typer.Option(help="Also store request/response bodies (capped, secret fields redacted)")] = False,
    body_cap: Annotated[int, typer.Option(help="Bytes kept per body with --keep-bodies")] = DEFAULT_BODY_CAP,
    live: Annotated[bool, typer.Option(help="Link chains and run the rules while traffic flows")] = True,
    confdir: Annotated[Path, typer.Option(help="mitmproxy's directory for its CA and settings")] = Path("~/.mitmproxy"),
) -> None:
    """Run mitmproxy with the recorder; anything after the options goes to mitmdump/mitmweb as is."""
    from analyzer.proxy import ProxyError, ProxyPlan

    plan = ProxyPlan(
        db_url=resolve_db_url(db), listen_host=listen_host, port=port, modes=mode or [], web=web,
        keep_bodies=keep_bodies, body_cap=body_cap, live=live, confdir=confdir.expanduser(), extra=list(ctx.args),
    )
    _open(db).close()  # a store that cannot be opened is reported here, in one line
    try:
        plan.argv()
    except ProxyError as exc:
        raise UserError(str(exc)) from None
    click.echo(plan.banner())
    sys.stdout.flush()
    plan.exec()


@app.command("analyze")
def analyze_cmd(
    db: DbOption = None,
    link_window: Annotated[float, typer.Option(help="Seconds within which a follow-up must start")] = DEFAULT_LINK_WINDOW,
    stale_days: Annotated[float, typer.Option(help="Days after which a temporary redirect is stale")] = DEFAULT_STALE_AFTER_DAYS,
    duplicate_window: Annotated[float, typer.Option(help="Seconds between two deliveries of one write")] = DEFAULT_DUPLICATE_WINDOW,
    max_redirects: Annotated[int, typer.Option(help="Follow-ups in one chain before too-many-redirects")] = DEFAULT_MAX_REDIRECTS,
) -> None:
    """Rebuild chains and run every rule (re-running replaces earlier results)."""
    try:
        options = AnalysisOptions(
            link=LinkOptions(window=link_window),
            detect=DetectorOptions(stale_after_days=stale_days, duplicate_window=duplicate_window,
                                   max_redirects=max_redirects),
        )
    except ValueError as exc:
        raise UserError(str(exc)) from None
    result = analyze(_open(db), options)
    counts = ", ".join(f"{n} {s}" for s, n in sorted(result.by_severity.items(), key=lambda kv: -Severity.parse(kv[0])))
    hops = sum(len(c.hops) for c in result.chains)
    click.echo(f"{len(result.chains)} chain(s), {hops} hop(s), {len(result.findings)} finding(s)"
               + (f": {counts}" if counts else ""))


@app.command("findings")
def findings_cmd(
    db: DbOption = None,
    format: Annotated[FindingFormat, typer.Option("--format", "-f")] = FindingFormat.table,
    min_severity: Annotated[str, typer.Option(help="info, low, medium or high")] = "info",
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write to this file instead of stdout",
                                                show_default=False)] = None,
) -> None:
    """List the findings of the last `analyze`.

    sarif: SARIF 2.1.0; junit: a test case per chain; markdown; html: one self-contained
    file with the plots and a table per rule.
    """
    floor = _severity(min_severity)
    with _open(db).begin() as conn:
        records = finding_records(conn, floor)
        chain_list = chain_records(conn) if format is FindingFormat.junit else []
    if output is not None:
        with output.open("w", encoding="utf-8") as fh, contextlib.redirect_stdout(fh):
            _write_findings(format, records, chain_list, db)
        click.echo(f"wrote {len(records)} finding(s) to {output}", err=True)
        return
    _write_findings(format, records, chain_list, db)


def _write_findings(format: FindingFormat, records: list[dict], chain_list: list[dict], db: str | None) -> None:
    if format is FindingFormat.html:
        from analyzer.htmlreport import render  # pandas and matplotlib, only when asked for

        sys.stdout.write(render(db, records))
    elif format is FindingFormat.json:
        write_json(records, sys.stdout)
    elif format is FindingFormat.jsonl:
        write_jsonl(records, sys.stdout)
    elif format is FindingFormat.sarif:
        json.dump(exports.sarif(records), sys.stdout, indent=2, ensure_ascii=False)
        sys.stdout.write("\n")
    elif format is FindingFormat.junit:
        sys.stdout.write(exports.junit(records, chain_list))
    elif format is FindingFormat.markdown:
        sys.stdout.write(exports.markdown(records))
    else:
        print_findings_table(records, out)


@app.command("check")
def check_cmd(
    db: DbOption = None,
    fail_on: Annotated[str, typer.Option(help="Lowest severity that fails: info, low, medium or high")] = "medium",
    baseline: Annotated[Path | None, typer.Option(help="Findings recorded here are known and do not fail")] = None,
    write_baseline: Annotated[Path | None, typer.Option(
        help="Record the current findings as the baseline and exit 0", show_default=False)] = None,
    reanalyze: Annotated[bool, typer.Option("--analyze/--no-analyze", help="Run analyze first")] = True,
) -> None:
    """CI gate: exit 1 when a finding at or above --fail-on is not in the baseline, else 0."""
    floor = _severity(fail_on)
    store = _open(db)
    if reanalyze:
        analyze(store)
    with store.begin() as conn:
        records = finding_records(conn)
    if write_baseline is not None:
        count = exports.write_baseline(records, write_baseline)
        click.echo(f"baseline: {count} finding(s) recorded in {write_baseline}")
        return
    try:
        known = exports.read_baseline(baseline) if baseline is not None else set()
    except exports.BaselineError as exc:
        raise UserError(str(exc)) from None
    failing = exports.gate(records, floor, known)
    for r in failing:
        click.echo(f"NEW {r['severity']:6} {r['rule_id']} {r['rule']}: {r['method_before']} {r['from_url']} -> "
                   f"{r['status']} -> {r['method_after'] or ''} {r['to_url']}")
    quiet = len(records) - len(failing)
    click.echo(f"check: {len(failing)} finding(s) at or above {floor} not in the baseline"
               f" ({quiet} other finding(s) known or below the bar)")
    if failing:
        raise typer.Exit(EXIT_FINDINGS)


@app.command("chains")
def chains_cmd(
    db: DbOption = None,
    url: Annotated[str | None, typer.Option(help="Only chains with a URL containing this")] = None,
    format: Annotated[ChainFormat, typer.Option("--format", "-f")] = ChainFormat.tree,
) -> None:
    """Show chains hop by hop: method, status, body and what changed."""
    with _open(db).begin() as conn:
        records = chain_records(conn, url)
    if format is ChainFormat.json:
        write_json(records, sys.stdout)
    else:
        print_chain_trees(records, out)


class ClientFormat(StrEnum):
    table = "table"
    json = "json"


@app.command("clients")
def clients_cmd(
    db: DbOption = None,
    format: Annotated[ClientFormat, typer.Option("--format", "-f")] = ClientFormat.table,
) -> None:
    """Per-client conformance: what each client did on every (status, method) it met, next to RFC 9110 / Fetch."""
    from analyzer import frames

    try:
        rows = frames.clients(resolve_db_url(db)).to_dict("records")
    except FileNotFoundError as exc:
        raise UserError(str(exc)) from None
    if format is ClientFormat.json:
        write_json(rows, sys.stdout)
    else:
        print_conformance_table(rows, out)


@app.command("rules")
def rules_cmd() -> None:
    """Describe every rule: id, slug, default severity and its documentation."""
    for rule in RULES:
        out.rule(f"{rule.id} {rule.slug} ({rule.severity})")
        out.print(rule.doc, markup=False, highlight=False)


@app.command("demo")
def demo_cmd(
    db: Annotated[str, typer.Option("--db", help="Store to (re)create for the demo")] = DEMO_DB,
) -> None:
    """Import the bundled sample capture, analyze it and print the findings."""
    build_demo_store(db, report=click.echo)
    store = _open(db)
    with store.begin() as conn:
        records = finding_records(conn)
        chain_count = len(chain_records(conn))
    click.echo(f"{chain_count} chain(s), {len(records)} finding(s)\n")
    print_findings_table(records, out)
    click.echo(f"\nExplore it: redirect-audit chains --db {db}   |   redirect-audit findings --db {db} --format json")


def _error(message: str) -> None:
    """One line on stderr, never wrapped."""
    click.echo(f"redirect-audit: error: {' '.join(message.split())}", err=True)


def _open(db: str | None) -> Store:
    return open_store(db)


def _severity(text: str) -> Severity:
    try:
        return Severity.parse(text)
    except ValueError as exc:
        raise UserError(str(exc)) from None


def main() -> None:
    """Console entry point: errors are one line on stderr and exit status 2, never a traceback."""
    try:
        code = app(standalone_mode=False)  # click returns an Exit's code instead of raising it here
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(EXIT_ERROR)
    except click.exceptions.Abort:
        err.print("redirect-audit: aborted")
        sys.exit(130)
    except (UserError, StoreError, ImportError_, ValueError) as exc:
        _error(str(exc))
        sys.exit(EXIT_ERROR)
    except OSError as exc:
        _error(f"{exc.filename or ''}: {exc.strerror or exc}")
        sys.exit(EXIT_ERROR)
    except Exception as exc:  # a bug of ours: still one line, the details on request
        if os.environ.get("REDIRECT_AUDIT_DEBUG"):
            raise
        _error(f"internal error: {type(exc).__name__}: {exc} (set REDIRECT_AUDIT_DEBUG=1 for the traceback)")
        sys.exit(EXIT_ERROR)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
