"""The `redirect-audit` command line (contract in design.md).

Each command imports what it needs when it runs, so that `--help`, a usage slip and a
reading command on current results answer without loading the analysis, pandas or
SQLAlchemy. Usage mistakes are click's: the usage line, the error and a hint, exit 2.
Everything else a user can act on is one line on stderr, exit 2; Ctrl-C is one line,
exit 130; a closed pipe (`| head`) ends quietly, exit 141, as for other Unix tools.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import shlex
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, ClassVar

import click

from analyzer import __version__
from analyzer.errors import ReportedError
from analyzer.text import counted, printable

if TYPE_CHECKING:  # for annotations only: each command imports what it runs
    from rich.console import Console

    from analyzer.analysis import AnalysisOptions, AnalysisResult
    from analyzer.config import Settings
    from analyzer.detectors import Rule
    from analyzer.model import Severity
    from analyzer.recorded import ClientSeen
    from analyzer.report import Record
    from analyzer.selection import Selection
    from analyzer.store import Store
    from analyzer.storeread import Reader, StoreState

EXIT_FINDINGS = 1
EXIT_ERROR = 2
# `run`: the gate's failure told apart from the command's (which keeps its own status)
EXIT_RUN_GATE = 90  # the command passed; new findings at or above --fail-on
EXIT_RUN_BOTH = 91  # the command failed and the gate failed
EXIT_INTERRUPTED = 130
EXIT_PIPE_CLOSED = 141
SEVERITIES = ("info", "low", "medium", "high")
DEBUG_ENV = "REDIRECT_AUDIT_DEBUG"
DEFAULT_BODY_CAP = 64 * 1024  # analyzer.ingest.common.DEFAULT_BODY_CAP, without importing it


class UserError(ReportedError):
    """A request the tool cannot carry out as asked; one line, exit status 2."""


class Interrupted(Exception):
    """Ctrl-C, with the one line that says what was and was not stored."""


class PipeClosed(Exception):
    """Whoever read our output stopped reading (`| head`)."""


# ---- shared options -------------------------------------------------------------------


class Size(click.ParamType):  # type: ignore[type-arg]  # generic in newer click only; 8.1 is supported
    """A byte count: 65536, 64KB, 64KiB, 1MB, 1.5MiB."""

    name = "size"
    UNITS: ClassVar[dict[str, int]] = {
        "": 1,
        "b": 1,
        "k": 1000,
        "kb": 1000,
        "kib": 1024,
        "m": 1000**2,
        "mb": 1000**2,
        "mib": 1024**2,
        "g": 1000**3,
        "gb": 1000**3,
        "gib": 1024**3,
    }

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        text = str(value).strip().lower().replace(" ", "")
        number = text.rstrip("bkmgi")
        unit = text[len(number) :]
        try:
            size = float(number) * self.UNITS[unit]
        except (ValueError, KeyError):
            self.fail(
                f"{value!r} is not a size (bytes, or a number with KB, MB, GB, KiB, MiB or GiB)", param, ctx
            )
        if size < 0:
            self.fail(f"{value!r} is negative", param, ctx)
        return int(size)


def db_option[F: Callable[..., Any]](f: F) -> F:
    return click.option(
        "--db",
        metavar="URL|PATH",
        help="Store: SQLAlchemy URL or SQLite path [default: $REDIRECT_AUDIT_DB, else ./redirect-audit.db]",
    )(f)


def wait_option[F: Callable[..., Any]](f: F) -> F:
    return click.option(
        "--wait",
        type=click.FloatRange(min=0),
        default=10.0,
        show_default=True,
        metavar="SECONDS",
        help="How long to wait for another process's write lock on the store",
    )(f)


def reading_options[F: Callable[..., Any]](f: F) -> F:
    """--db, --no-analyze and --wait: every command that reads results."""
    f = wait_option(f)
    f = click.option(
        "--no-analyze",
        is_flag=True,
        help="Read the results as they are, even when the store changed since its last analysis",
    )(f)
    return db_option(f)


def output_option[F: Callable[..., Any]](f: F) -> F:
    return click.option(
        "--output", "-o", metavar="FILE", help="Write to FILE instead of stdout ('-': stdout)"
    )(f)


def secret_field_option[F: Callable[..., Any]](f: F) -> F:
    return click.option(
        "--secret-field",
        "secret_fields",
        multiple=True,
        metavar="NAME",
        help="Also protect this query/body field name (repeatable; see README, Secrets)",
    )(f)


def key_file_option[F: Callable[..., Any]](f: F) -> F:
    return click.option(
        "--key-file",
        metavar="PATH",
        help="Keep the store's fingerprint key in this file, not in the store (created with the "
        "store; later needed to write to it) [default: $REDIRECT_AUDIT_KEY_FILE]",
    )(f)


def upstream_ca_option[F: Callable[..., Any]](f: F) -> F:
    return click.option(
        "--upstream-ca",
        type=click.Path(dir_okay=False, exists=True, resolve_path=True),
        callback=_check_pem,
        help="Trust the upstream servers whose certificates this PEM file's CA signed (a test "
        "server's own CA), with verification kept on for every other server",
    )(f)


def _check_pem(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is not None and b"-----BEGIN CERTIFICATE-----" not in Path(value).read_bytes()[: 1 << 20]:
        raise click.BadParameter(f"{value} holds no PEM certificate (-----BEGIN CERTIFICATE-----)")
    return value


def keep_bodies_option[F: Callable[..., Any]](f: F) -> F:
    return click.option(
        "--keep-bodies",
        is_flag=True,
        help="Also store request/response bodies (capped, secret fields redacted)",
    )(f)


def spool_dir_option[F: Callable[..., Any]](f: F) -> F:
    return click.option(
        "--spool-dir",
        type=click.Path(file_okay=False),
        help="Directory for exchanges the store cannot take (locked, full, down), replayed into it "
        "later [default: next to the store, STORE.spool; moved off its filesystem when that is full]",
    )(f)


def baseline_option[F: Callable[..., Any]](f: F) -> F:
    return click.option(
        "--baseline", type=click.Path(dir_okay=False), help="Findings recorded here are known and do not fail"
    )(f)


def _rule_list(values: tuple[str, ...]) -> list[str]:
    return [v.strip() for value in values for v in value.split(",") if v.strip()]


def selection_options[F: Callable[..., Any]](f: F) -> F:
    """What the project's configuration says, and the command line over it (analyzer.selection)."""
    f = click.option("--verbose", "-v", is_flag=True, help="Say which configuration file is used")(f)
    return selection_options_quiet(f)


def selection_options_quiet[F: Callable[..., Any]](f: F) -> F:
    """selection_options without -v, for a command whose -v says more."""
    options = [
        click.option(
            "--config",
            "config_file",
            metavar="FILE",
            help="Configuration file [default: redirect-audit.toml, or pyproject.toml's "
            "[tool.redirect-audit], found from the working directory up]",
        ),
        click.option("--isolated", is_flag=True, help="Ignore every configuration file"),
        click.option(
            "--select",
            multiple=True,
            metavar="RULES",
            help="Only these rules (ids, names or id prefixes, comma-separated; replaces the file's select)",
        ),
        click.option("--ignore", multiple=True, metavar="RULES", help="Suppress these rules too"),
        click.option("--extend-select", multiple=True, metavar="RULES", help="Select these rules too"),
        click.option(
            "--min-confidence",
            type=click.FloatRange(0, 1),
            metavar="0-1",
            help="Suppress findings less sure than this",
        ),
        click.option(
            "--third-party/--no-third-party",
            default=None,
            help="Show findings between third parties of a browser page (hidden by default)",
        ),
        click.option(
            "--host",
            "hosts",
            multiple=True,
            metavar="GLOB",
            help="Only findings whose redirect starts or ends on this host (repeatable)",
        ),
        click.option("--show-suppressed", is_flag=True, help="List the suppressed findings too, marked"),
    ]
    for option in reversed(options):
        f = option(f)
    return f


@dataclass
class Chosen:
    """The selection a reading command applies, and what it says about it."""

    selection: Selection
    settings: Settings
    hosts: tuple[str, ...]
    show_suppressed: bool


def _chosen(
    config_file: str | None,
    isolated: bool,
    select: tuple[str, ...],
    ignore: tuple[str, ...],
    extend_select: tuple[str, ...],
    min_confidence: float | None,
    third_party: bool | None,
    hosts: tuple[str, ...],
    show_suppressed: bool,
    verbose: bool,
) -> Chosen:
    from analyzer.config import UnknownRule, load_settings
    from analyzer.selection import Selection

    settings = load_settings(config_file, isolated)
    if verbose:
        _say_err(
            f"configuration: {settings.path}"
            if settings.path is not None
            else "configuration: none (--isolated)"
            if isolated
            else f"configuration: no redirect-audit.toml or [tool.redirect-audit] from {Path.cwd()} up"
        )
    try:
        selection = Selection.build(
            settings,
            select=_rule_list(select) or None,
            ignore=_rule_list(ignore),
            extend_select=_rule_list(extend_select),
            min_confidence=min_confidence,
            third_party=third_party,
        )
    except UnknownRule as exc:
        raise UserError(f"unknown rule {exc.name!r} on the command line ({exc.known})") from None
    return Chosen(selection, settings, hosts, show_suppressed)


def _say_err(line: str) -> None:
    click.echo(f"redirect-audit: {printable(line)}", err=True)


def import_options[F: Callable[..., Any]](f: F) -> F:
    f = wait_option(f)
    f = key_file_option(f)
    f = secret_field_option(f)
    f = click.option(
        "--force", is_flag=True, help="Import content the store already holds, as a capture of its own"
    )(f)
    f = click.option(
        "--body-cap",
        type=Size(),
        default=DEFAULT_BODY_CAP,
        show_default=True,
        help="Bytes kept per body with --keep-bodies (65536, 64KB, 1MiB, ...)",
    )(f)
    f = keep_bodies_option(f)
    return db_option(f)


# ---- the group --------------------------------------------------------------------------


@click.group(
    invoke_without_command=True,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog="Exit status: 0 done; 1 `check` found new findings; 2 an error (one line on stderr); "
    "130 interrupted. Docs: README.md, `redirect-audit rules`.",
)
@click.version_option(__version__, "--version", prog_name="redirect-audit", message="%(prog)s %(version)s")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """Rebuild HTTP redirect chains from captures and say which hop went wrong, why, and how to fix it.

    \b
    Start:  redirect-audit demo
    HAR:    redirect-audit import-har session.har && redirect-audit findings
    Proxy:  redirect-audit proxy --db capture.db   (then run your tests through it)
    CI:     redirect-audit check --fail-on medium --baseline known.json
    """
    if ctx.invoked_subcommand is None:
        click.echo(ctx.get_help())


# ---- writing commands -------------------------------------------------------------------


@cli.command("import-har")
@click.argument("files", nargs=-1, required=True, metavar="FILE...")
@import_options
@click.option(
    "--workers",
    type=click.IntRange(min=0),
    default=None,
    help="Processes converting entries [default: one per CPU, at most 4, for files over 16 MB; 0: none]",
)
@click.option(
    "--strict",
    is_flag=True,
    help="Refuse a file cut off or damaged after its entries began (by default its complete "
    "entries before the damage are imported, with a warning)",
)
def import_har_cmd(
    files: tuple[str, ...],
    db: str | None,
    keep_bodies: bool,
    body_cap: int,
    secret_fields: tuple[str, ...],
    key_file: str | None,
    force: bool,
    wait: float,
    workers: int | None,
    strict: bool,
) -> None:
    """Import HAR files (1.1, 1.2); '-' reads one from stdin.

    Each file is one transaction: a bad file leaves nothing behind and the others still go
    in. A file whose content is already in the store is skipped (--force imports it again).
    A file cut off or damaged part way (browsers and upload limits truncate exports) keeps
    its complete entries before the damage, says where it broke, and its capture is marked
    damaged; --strict refuses it instead.
    """
    from analyzer.ingest import CaptureOptions, import_har

    store = _StoreOnDemand(db, wait, key_file)
    options = CaptureOptions(keep_bodies=keep_bodies, body_cap=body_cap, secret_fields=secret_fields)

    def one(path: str, name: str) -> Any:
        return _with_progress(
            path,
            name,
            lambda progress: import_har(
                store.get(), path, options, progress, workers=workers, force=force, name=name, strict=strict
            ),
        )

    _import_files(files, one, "entries", store)


@cli.command("import-flows")
@click.argument("files", nargs=-1, required=True, metavar="FILE...")
@import_options
def import_flows_cmd(
    files: tuple[str, ...],
    db: str | None,
    keep_bodies: bool,
    body_cap: int,
    secret_fields: tuple[str, ...],
    key_file: str | None,
    force: bool,
    wait: float,
) -> None:
    """Import flows saved by `mitmdump -w` or mitmweb; '-' reads a dump from stdin.

    One transaction per file, as for import-har; content already in the store is skipped.
    """
    from analyzer.ingest import CaptureOptions
    from analyzer.ingest.flows import import_flows  # the one module that needs mitmproxy

    store = _StoreOnDemand(db, wait, key_file)
    options = CaptureOptions(keep_bodies=keep_bodies, body_cap=body_cap, secret_fields=secret_fields)
    _import_files(
        files,
        lambda path, name: import_flows(store.get(), path, options, force=force, name=name),
        "flows",
        store,
    )


def _open_for_writing(db: str | None, wait: float, key_file: str | None = None) -> Store:
    from analyzer.store import open_store

    store = open_store(db, wait=wait, key_file=key_file)
    store.secret_key  # noqa: B018 - a store whose key is outside it and not given: say so before any work
    return store


class _StoreOnDemand:
    """The store an import writes to, opened (and created) for the first file that can be
    read: `import-har missing.har` must not leave an empty store behind."""

    def __init__(self, db: str | None, wait: float, key_file: str | None):
        self.db, self.wait, self.key_file = db, wait, key_file
        self._store: Store | None = None

    def get(self) -> Store:
        if self._store is None:
            self._store = _open_for_writing(self.db, self.wait, self.key_file)
        return self._store

    def newest_capture(self) -> int:
        """The highest capture id so far (0 before the store is opened)."""
        if self._store is None:
            return 0
        from sqlalchemy import func, select

        from analyzer.store import captures

        with self._store.begin() as conn:
            return conn.execute(select(func.max(captures.c.id))).scalar() or 0


def _import_files(
    files: tuple[str, ...], import_one: Callable[[str, str], Any], noun: str, store: _StoreOnDemand
) -> None:
    """Import each file in turn: a file that fails is named in one line and the others
    still go in; exit status 2 at the end if any failed. Ctrl-C stops at the file in hand,
    of which nothing is stored."""
    from analyzer.ingest import AlreadyImported
    from analyzer.storeread import StoreOutdated

    failed, stored = 0, 0
    for given in files:
        name = "<stdin>" if given == "-" else given
        newest = store.newest_capture()
        try:
            if given != "-":
                _check_readable(given)
            with _readable(given) as path:
                result = import_one(path, name)
        except KeyboardInterrupt:
            raise Interrupted(_interrupted_import(name, stored, store, newest)) from None
        except AlreadyImported as exc:
            _say(str(exc))
            continue
        except StoreOutdated:
            raise  # about the store, not this file: no file can go in until it is upgraded
        except ReportedError as exc:
            text = str(exc)
            _error(text if text.startswith(name) else f"{name}: {text}")
            failed += 1
            continue
        except Exception as exc:
            if os.environ.get(DEBUG_ENV):
                raise
            _error(
                f"{name}: not imported: internal error: {type(exc).__name__}: {exc} "
                f"(set {DEBUG_ENV}=1 for the traceback)"
            )
            failed += 1
            continue
        stored += 1
        note = f", {counted(result.warnings, 'field')} unreadable and left empty" if result.warnings else ""
        _say(f"imported {result.entries} {noun} from {name} as capture {result.capture_id}{note}")
        if getattr(result, "damage", None):
            click.echo(
                f"redirect-audit: warning: {name}: {result.damage}; its capture is marked damaged "
                "(`captures` shows it; --strict refuses such a file)",
                err=True,
            )
        if result.odd_dates[0]:
            _warn_dates(name, noun, *result.odd_dates)
    if failed:
        raise click.exceptions.Exit(EXIT_ERROR)


def _warn_dates(name: str, noun: str, count: int, first: list[tuple[int, float]]) -> None:
    one = {"entries": "entry", "flows": "flow"}.get(noun, noun)
    which = ", ".join(f"{one} {seq} (year ~{1970 + ts / 31_556_952:.0f})" for seq, ts in first)
    click.echo(
        f"redirect-audit: warning: {name}: {count} of its {noun} dated outside 1677-2262, which reports "
        f"and frames cannot place on a timeline; kept as given: {which}",
        err=True,
    )


def _interrupted_import(name: str, stored: int, store: _StoreOnDemand, newest: int) -> str:
    """What to say after Ctrl-C during the import of `name`. The store is asked, since the
    signal can come after the file's transaction committed and before the import returned."""
    before = f"; the {counted(stored, 'file')} before it were stored" if stored else ""
    if store.newest_capture() > newest:
        return f"interrupted: {name} was stored just before{before}; nothing after it was imported"
    return f"interrupted: nothing of {name} was stored{before}"


def _check_readable(path: str) -> None:
    try:
        if Path(path).is_dir():
            raise UserError(f"{path}: is a directory, not a capture file")
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise UserError(f"{path}: cannot read: {exc.strerror or exc}") from None


@contextmanager
def _readable(given: str) -> Iterator[str]:
    """A path to read a capture from: the file itself, or for '-' what stdin holds, kept in
    memory (an anonymous memory file on Linux), never written to disk."""
    if given != "-":
        yield given
        return
    if sys.stdin is None or sys.stdin.isatty():
        raise UserError(
            "'-' reads a capture from stdin, but stdin is a terminal: pipe a file in "
            "(cat session.har | redirect-audit import-har -)"
        )
    if not hasattr(os, "memfd_create"):
        raise UserError("'-' (stdin) needs Linux's memfd_create; give a file path instead")
    fd = os.memfd_create("redirect-audit-stdin")
    try:
        with os.fdopen(os.dup(fd), "wb") as sink:
            while chunk := sys.stdin.buffer.read(1 << 20):
                sink.write(chunk)
        yield f"/proc/{os.getpid()}/fd/{fd}"  # readable by path, so worker processes can open it too
    finally:
        os.close(fd)


def _with_progress(path: str, name: str, run: Callable[[Callable[[int], None] | None], Any]) -> Any:
    """A progress bar on stderr while a file imports, when stderr is a terminal."""
    if not sys.stderr.isatty():
        return run(None)
    import time

    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

    columns = (
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    # No refresh thread: the importer may fork its workers, which wants a single thread.
    with Progress(*columns, console=_console(sys.stderr), transient=True, auto_refresh=False) as bar:
        size = Path(path).stat().st_size if Path(path).exists() else None
        task = bar.add_task(Path(name).name, total=size)
        shown = [0.0]

        def advance(n: int) -> None:
            bar.advance(task, n)
            now = time.monotonic()
            if now - shown[0] > 0.1:
                shown[0] = now
                bar.refresh()

        return run(advance)


@cli.command("proxy", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@db_option
@click.option("--listen-host", default="127.0.0.1", show_default=True, help="Address the proxy listens on")
@click.option(
    "--port",
    "-p",
    type=click.IntRange(0, 65535),
    default=8080,
    show_default=True,
    help="Port the proxy listens on",
)
@click.option(
    "--mode",
    "-m",
    multiple=True,
    help="mitmproxy mode, repeatable (regular, reverse:URL, socks5, upstream:URL, ...)",
)
@click.option("--web", is_flag=True, help="Run mitmweb (flows in a browser UI) instead of mitmdump")
@keep_bodies_option
@click.option(
    "--body-cap",
    type=Size(),
    default=DEFAULT_BODY_CAP,
    show_default=True,
    help="Bytes kept per body with --keep-bodies",
)
@click.option(
    "--live/--no-live",
    default=True,
    show_default=True,
    help="Link chains and run the rules while traffic flows",
)
@click.option(
    "--confdir",
    default="~/.mitmproxy",
    show_default=True,
    help="mitmproxy's directory for its CA and settings",
)
@click.option(
    "--proxy-id",
    default="",
    metavar="NAME",
    help="This proxy's name in the store; clients are told apart by it and their address, so "
    "proxies sharing a store never link each other's traffic [default: host name:port]",
)
@upstream_ca_option
@spool_dir_option
@secret_field_option
@key_file_option
@click.pass_context
def proxy_cmd(
    ctx: click.Context,
    db: str | None,
    listen_host: str,
    port: int,
    mode: tuple[str, ...],
    web: bool,
    keep_bodies: bool,
    body_cap: int,
    live: bool,
    confdir: str,
    proxy_id: str,
    upstream_ca: str | None,
    spool_dir: str | None,
    secret_fields: tuple[str, ...],
    key_file: str | None,
) -> None:
    """Run mitmproxy with the recorder; what follows the options goes to mitmdump/mitmweb as is.

    Stop it with Ctrl-C; the findings are then one command away (the last line says which).
    """
    from analyzer.proxy import ProxyError, ProxyPlan
    from analyzer.storeread import resolve_db_url

    plan = ProxyPlan(
        db_url=resolve_db_url(db),
        listen_host=listen_host,
        port=port,
        modes=list(mode),
        web=web,
        keep_bodies=keep_bodies,
        body_cap=body_cap,
        live=live,
        confdir=Path(confdir).expanduser(),
        extra=list(ctx.args)
        + (["--set", f"ssl_verify_upstream_trusted_ca={upstream_ca}"] if upstream_ca else []),
        then=f"{command_prefix()} findings --db {shlex.quote(_db_shown(db))}",
        secret_fields=secret_fields,
        key_file=key_file,
        proxy_id=proxy_id,
        spool_dir=spool_dir,
    )
    try:
        plan.check()  # options that conflict, a busy port: one line, before anything is printed
        _open_for_writing(db, 10.0, key_file).close()  # as is a store that cannot be opened
        plan.argv()
    except ProxyError as exc:
        raise UserError(str(exc)) from None
    _say(plan.banner())
    plan.exec()


def _enter_own_network(db: str | None) -> None:
    """`run --transparent`: this process, and so the recorder and CMD, in a network namespace
    of its own. A store over TCP would be out of reach there: said before anything starts."""
    from sqlalchemy.engine import make_url

    from analyzer.netns import NamespaceError, enter_own_network
    from analyzer.storeread import resolve_db_url

    url = make_url(resolve_db_url(db)) if db is not None else None  # None: a fresh SQLite store
    socket_dir = str(url.query.get("host", "")) if url is not None else ""
    if url is not None and url.get_backend_name() != "sqlite" and url.host and not socket_dir.startswith("/"):
        raise UserError(
            f"--transparent: the store {_db_shown(db)} is reached over TCP, which the network "
            "namespace CMD and the recorder run in cannot reach; use SQLite, or PostgreSQL "
            "over its Unix socket (postgresql://user@/db?host=/run/postgresql)"
        )
    try:
        enter_own_network()
    except NamespaceError as exc:
        raise UserError(str(exc)) from None


@cli.command("run", context_settings={"allow_interspersed_args": False})
@click.argument("command", nargs=-1, required=True, metavar="-- CMD [ARGS]...")
@click.option(
    "--db",
    metavar="URL",
    help="Keep the exchanges in this store (SQLAlchemy URL or file path) "
    "[default: a fresh store in a new temporary directory, printed]",
)
@click.option(
    "--fail-on",
    type=click.Choice(SEVERITIES),
    help="Lowest severity of a new finding that fails the run (when CMD itself succeeded) "
    "[default: the configuration's fail-on, else medium]",
)
@baseline_option
@click.option(
    "--label",
    metavar="NAME",
    help="Client label CMD's traffic is recorded under (in the proxy URL CMD is given)",
)
@keep_bodies_option
@click.option(
    "--confdir",
    default="~/.mitmproxy",
    show_default=True,
    envvar="REDIRECT_AUDIT_CONFDIR",
    help="mitmproxy's directory for its CA and settings [env: REDIRECT_AUDIT_CONFDIR]",
)
@click.option(
    "--set",
    "settings",
    multiple=True,
    metavar="NAME=VALUE",
    help="A mitmproxy option for the recorder, repeatable (e.g. ssl_insecure=true for test servers "
    "with self-signed certificates)",
)
@click.option(
    "--verbose",
    "-v",
    is_flag=True,
    help="List the environment variables set for CMD, and say which configuration file is used",
)
@click.option(
    "--allow-empty",
    is_flag=True,
    help="A run that recorded no exchange passes (by default it exits 2: nothing was judged)",
)
@click.option(
    "--transparent",
    is_flag=True,
    help="Run CMD in a network namespace of its own where every TCP connection it opens is "
    "redirected to the recorder: clients that ignore proxies (Go on loopback, curl --noproxy) "
    "are recorded too. Linux, as root, with nft; CMD reaches only the servers it starts itself",
)
@upstream_ca_option
@spool_dir_option
@secret_field_option
@key_file_option
@selection_options_quiet
def run_cmd(
    command: tuple[str, ...],
    db: str | None,
    fail_on: str | None,
    baseline: str | None,
    label: str | None,
    keep_bodies: bool,
    confdir: str,
    settings: tuple[str, ...],
    verbose: bool,
    allow_empty: bool,
    transparent: bool,
    upstream_ca: str | None,
    spool_dir: str | None,
    secret_fields: tuple[str, ...],
    key_file: str | None,
    **choosing: Any,
) -> None:
    """Run CMD with its HTTP(S) traffic recorded, then analyze it and print the findings.

    CMD gets the proxy in HTTP_PROXY, HTTPS_PROXY and ALL_PROXY (both cases), a CA bundle
    with the system's CAs and mitmproxy's (SSL_CERT_FILE, REQUESTS_CA_BUNDLE,
    CURL_CA_BUNDLE; NODE_EXTRA_CA_CERTS), NO_PROXY without its loopback entries, a
    preload in NODE_OPTIONS that sends Node's fetch and http/https through the recorder,
    and Java's proxy properties and truststore in JAVA_TOOL_OPTIONS. With --transparent,
    no proxy at all: the kernel sends CMD's connections to the recorder (the CA variables
    are still set).
    At the end it says what it recorded: exchanges per client, TLS handshakes a client
    refused (it does not trust the recorder's CA), and, when nothing was recorded, why
    that may be. Exit status: 0 when CMD passed and no finding at or above --fail-on is
    new (not in the baseline); CMD's own when it failed and the gate passed; 90 when CMD
    passed and the gate failed; 91 when both failed; 2 when nothing was recorded (unless
    --allow-empty) or redirect-audit itself could not do its part; 130 after Ctrl-C.

    \b
        redirect-audit run -- pytest tests/api
        redirect-audit run --db capture.db --fail-on high -- npm test
    """
    import tempfile

    from analyzer import exports
    from analyzer.model import Severity
    from analyzer.report import hop_text
    from analyzer.session import Recording, SessionError, run_command
    from analyzer.storeread import resolve_db_url

    def say(line: str) -> None:
        click.echo(f"redirect-audit run: {line}", err=True)

    for setting in settings:
        if "=" not in setting:
            raise click.BadParameter(f"{setting!r} is not NAME=VALUE", param_hint="--set")
    chosen = _chosen(**choosing, verbose=verbose)  # a bad configuration: before CMD runs
    fail_on = fail_on or chosen.settings.fail_on or "medium"
    known = (
        exports.read_baseline(Path(baseline)) if baseline is not None else set()
    )  # a bad file: before CMD runs
    if transparent:
        _enter_own_network(db)
    fresh = db is None
    workdir = Path(tempfile.mkdtemp(prefix="redirect-audit-run-"))
    if db is None:
        db = str(workdir / "capture.db")
    extra = list(settings)
    if secret_fields:
        extra.append(f"redirect_audit_secret_fields={','.join(secret_fields)}")
    if upstream_ca:
        extra.append(f"ssl_verify_upstream_trusted_ca={upstream_ca}")
    recording = Recording(
        db_url=resolve_db_url(db),
        workdir=workdir,
        label=label,
        confdir=Path(confdir).expanduser(),
        keep_bodies=keep_bodies,
        settings=extra,
        key_file=key_file,
        transparent=transparent,
        spool_dir=spool_dir,
    )
    # CMD starts while mitmdump boots (it adopts a listening socket bound here, where CMD's
    # connections wait meanwhile), unless the recorder must answer first: a label's own
    # listener, the transparent one, a CA to make, or the user's mitmproxy settings to check
    recording.prebind = not (transparent or label or settings) and recording.ca.exists()
    keep_workdir = False  # the fresh store lives there once CMD ran; the recorder's log when it failed
    try:
        try:  # a store that cannot be opened: one line, before CMD runs (checked while mitmdump boots)
            if recording.prebind:
                recording.launch()
                try:
                    _open_for_writing(db, 10.0, key_file).close()
                except BaseException:
                    recording.stop()
                    raise
            else:
                recording.start(while_starting=lambda: _open_for_writing(db, 10.0, key_file).close())
            if transparent:
                from analyzer.netns import NamespaceError, redirect_to

                try:
                    redirect_to(recording.transparent_port, [recording.port])
                except NamespaceError as exc:
                    raise UserError(str(exc)) from None
        except SessionError as exc:
            raise UserError(str(exc)) from None
        env, changed = recording.environ()
        where = f"a fresh store, {db}" if fresh else _db_shown(db)
        labelled = f" (label {label})" if label else ""
        if transparent:
            say(
                f"{command[0]} runs in a network namespace of its own: every TCP connection it opens "
                "goes to the recorder, and it reaches only the servers it starts itself"
            )
            say(f"recording transparently{labelled} into {where}")
        else:
            say(f"recording through {recording.url}{labelled} into {where}")
        if verbose:
            for name in changed:
                say(f"  {name}={env[name]}" if name in env else f"  {name} removed")
        try:
            child = run_command(list(command), env)
        except SessionError as exc:
            raise UserError(str(exc)) from None
        keep_workdir = fresh
        runtimes = recording.runtimes()
        proxy_status: int | None
        totals: tuple[int, int] | None
        if recording.prebind and recording.untouched() and recording.stop_unused():
            # CMD never connected: nothing to wait for (`run -- true` costs no recorder start-up)
            flushed, proxy_status, totals = {}, 0, recording.totals() or (0, 0)
        else:
            try:
                if recording.prebind and recording.running:
                    recording.ready()
                flushed = recording.flush() if recording.running else {}
            except (OSError, SessionError):
                flushed = {}
            proxy_status = recording.stop()
            totals = recording.totals()
        capture = flushed.get("capture")
        status = (
            f"exited with {child.status}"
            if child.status < 128 or not child.interrupted
            else "was interrupted"
        )
        seen = (
            f"{counted(totals[0], 'exchange')} seen, {totals[1]} stored"
            if totals
            else "the recorder's totals are missing"
        )
        say(f"{shlex.join(command)} {status}; {seen}")
        if totals is None or proxy_status not in (0, None):
            from analyzer.session import last_error

            keep_workdir = True
            raise UserError(f"the recorder failed: {last_error(recording.output())} (log: {recording.log})")
        records, hidden, failing, seen_clients = _judge_run(
            db, capture, Severity.parse(fail_on), known, chosen
        )
    finally:
        if recording.running:
            recording.stop()
        if not keep_workdir:
            import shutil

            shutil.rmtree(workdir, ignore_errors=True)
    from analyzer import recorded

    refused = flushed.get("tls_refused") or {}
    say(recorded.recorded_line(seen_clients))
    for line in recorded.tls_lines(refused, flushed.get("tls_upstream_failed") or {}):
        say(line)
    started = recorded.runtimes_line(runtimes)
    if started:
        say(started)
    unproxied = sorted({str(t) for r in runtimes for t in r.get("unproxied") or ()})  # from the plugin
    if unproxied:
        say(recorded.unproxied_line(unproxied))
    if not seen_clients:
        say("nothing was judged, so this is not an all-clear. It may be that:")
        for reason in recorded.empty_reasons(
            refused=refused, unproxied=len(unproxied), pytest=_is_pytest(command), transparent=transparent
        ):
            say(f"  - {reason}")
        say("(--allow-empty accepts a run that records nothing; -v lists the variables CMD was given)")
        if child.status != 0:
            raise click.exceptions.Exit(child.status)
        if not allow_empty:
            raise click.exceptions.Exit(EXIT_ERROR)
    listed = records + hidden if chosen.show_suppressed else records
    _emit(None, lambda out: _print_findings(listed, out, " in this run's traffic"))
    if hidden:
        from analyzer.selection import suppressed_summary

        say(suppressed_summary(hidden))
    for r in failing:
        say(f"NEW {r['severity']} {r['rule_id']} {r['rule']}: {printable(hop_text(r))}")
    say(
        f"{counted(len(failing), 'finding')} at or above {fail_on} not in the baseline; "
        f"the chains: {command_prefix()} chains --db {shlex.quote(_db_shown(db))}"
    )
    if child.interrupted or (child.status != 0 and not failing):
        raise click.exceptions.Exit(child.status)
    if failing:
        if child.status != 0:
            say(
                f"exit status {EXIT_RUN_BOTH}: the command failed (status {child.status}) and so did the "
                f"gate ({EXIT_RUN_GATE} when only the gate fails, the command's own status when only it does)"
            )
            raise click.exceptions.Exit(EXIT_RUN_BOTH)
        say(
            f"exit status {EXIT_RUN_GATE}: the command passed and the gate failed ({EXIT_RUN_BOTH} when "
            "both fail, the command's own status when only it does)"
        )
        raise click.exceptions.Exit(EXIT_RUN_GATE)


def _judge_run(
    db: str, capture: int | None, floor: Severity, known: set[str], chosen: Chosen
) -> tuple[list[Record], list[Record], list[Record], list[ClientSeen]]:
    """Analyze the store (with the configuration's thresholds); (this capture's findings
    shown, those suppressed, those that fail the gate, its clients)."""
    from analyzer import exports
    from analyzer.analysis import AnalysisOptions, analyze
    from analyzer.recorded import clients_seen
    from analyzer.report import finding_records
    from analyzer.selection import only
    from analyzer.store import open_store
    from analyzer.storeread import open_reader

    store = open_store(db, create=False)
    try:
        analyze(store, AnalysisOptions.from_dict(chosen.settings.thresholds))
        seen = clients_seen(store, capture_ids=[capture]) if capture is not None else []
    finally:
        store.close()
    with open_reader(db) as reader:
        records = finding_records(reader, capture_id=capture) if capture is not None else []
    shown, hidden = chosen.selection.apply(records)
    shown, hidden = only(shown, hosts=chosen.hosts), only(hidden, hosts=chosen.hosts)
    return shown, hidden, exports.gate(shown, floor, known), seen


def _is_pytest(command: tuple[str, ...]) -> bool:
    """Is CMD a pytest run (`pytest`, `py.test`, `python -m pytest`, `uv run pytest`)?"""
    return any(Path(arg).name in ("pytest", "py.test") for arg in command[:4])


@cli.command("demo")
@click.option(
    "--db",
    default="redirect-audit-demo.db",
    show_default=True,
    metavar="PATH",
    help="Store to (re)create for the demo",
)
def demo_cmd(db: str) -> None:
    """Import the bundled sample capture, analyze it and print the findings."""
    from analyzer.demo_store import build_demo_store
    from analyzer.report import chain_records, finding_records
    from analyzer.storeread import open_reader

    build_demo_store(db, report=_say)
    with open_reader(db) as reader:
        records = finding_records(reader)
        chain_count = len(chain_records(reader))
    _say(f"{counted(chain_count, 'chain')}, {counted(len(records), 'finding')}\n")
    _emit(None, lambda out: _print_findings(records, out, ""))
    prefix, where = command_prefix(), shlex.quote(db)
    _say(f"\nExplore it: {prefix} chains --db {where}   |   {prefix} findings --db {where} --format json")


# ---- analysis ---------------------------------------------------------------------------


@cli.command("analyze")
@db_option
@click.option(
    "--link-window",
    type=float,
    help="Seconds within which a follow-up must start [default: link-window in the configuration, else 30]",
)
@click.option(
    "--stale-days",
    type=float,
    help="Days after which a temporary redirect is stale [default: stale-after-days, else 7]",
)
@click.option(
    "--duplicate-window",
    type=float,
    help="Seconds between two deliveries of one write [default: duplicate-window, else 600]",
)
@click.option(
    "--max-redirects",
    type=int,
    help="Follow-ups in one chain before too-many-redirects [default: max-redirects, else 20]",
)
@click.option(
    "--jobs",
    "-j",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Worker processes analyzing clients in parallel",
)
@click.option("--full", is_flag=True, help="Analyze every client again, not only those with new exchanges")
@click.option(
    "--window",
    "window",
    type=click.IntRange(min=1),
    metavar="EXCHANGES",
    help="Read a bigger batch of clients in time windows of about this many exchanges: "
    "memory is one window's (about 2 KB an exchange), the results the same [default: 25,000]",
)
@click.option(
    "--dask",
    "dask_address",
    metavar="ADDRESS",
    help="Analyze on a Dask cluster: its scheduler (tcp://host:8786), or local:N for N worker "
    "processes on this machine. Needs --parquet; every client is analyzed (needs the dask extra)",
)
@click.option(
    "--parquet",
    "parquet_dir",
    metavar="DIR",
    help="With --dask: the Parquet export the workers read, at a path they share; "
    "a new or empty DIR gets the store's export first",
)
@click.option(
    "--out",
    "out_dir",
    metavar="DIR",
    help="With --dask: also write the chains, hops and findings as Parquet under this new directory",
)
@click.option(
    "--no-store",
    is_flag=True,
    help="With --dask: leave the store's results as they are (write --out only)",
)
@click.option(
    "--config", "config_file", metavar="FILE", help="Configuration file [default: found from here up]"
)
@click.option("--isolated", is_flag=True, help="Ignore every configuration file")
@wait_option
def analyze_cmd(
    db: str | None,
    link_window: float | None,
    stale_days: float | None,
    duplicate_window: float | None,
    max_redirects: int | None,
    jobs: int,
    full: bool,
    window: int | None,
    dask_address: str | None,
    parquet_dir: str | None,
    out_dir: str | None,
    no_store: bool,
    config_file: str | None,
    isolated: bool,
    wait: float,
) -> None:
    """Rebuild chains and run every rule for the clients with new exchanges (all of them
    with --full or new options), replacing their earlier results; ids stay as they were.
    A client with more exchanges than memory holds is read in time windows.

    Reading commands re-run this on their own when the store changed; the options given
    here are remembered and used again then.

    With --dask, a Dask cluster analyzes every client from a Parquet export, and the
    results replace the store's (and go to --out as Parquet).
    """
    from analyzer.analysis import WINDOW_EXCHANGES, AnalysisOptions, analyze
    from analyzer.chains import LinkOptions
    from analyzer.config import load_settings
    from analyzer.detectors import DetectorOptions
    from analyzer.store import open_store

    configured = AnalysisOptions.from_dict(load_settings(config_file, isolated).thresholds)
    try:
        options = AnalysisOptions(
            link=LinkOptions(window=configured.link.window if link_window is None else link_window),
            detect=DetectorOptions(
                stale_after_days=configured.detect.stale_after_days if stale_days is None else stale_days,
                duplicate_window=configured.detect.duplicate_window
                if duplicate_window is None
                else duplicate_window,
                max_redirects=configured.detect.max_redirects if max_redirects is None else max_redirects,
            ),
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    cluster_only = {"--parquet": parquet_dir, "--out": out_dir, "--no-store": no_store or None}
    if dask_address is None:
        given = [name for name, value in cluster_only.items() if value is not None]
        if given:
            raise click.UsageError(f"{', '.join(given)} go(es) with --dask ADDRESS")
    else:
        if parquet_dir is None:
            raise click.UsageError(
                "--dask needs --parquet DIR: the Parquet export the workers read, at a path they "
                "share (a new or empty DIR gets the store's export first)"
            )
        clashing = [n for n, v in (("--jobs", jobs > 1 or None), ("--window", window)) if v is not None]
        if clashing:
            raise click.UsageError(f"{', '.join(clashing)} cannot go with --dask (the cluster sets both)")
        if no_store and out_dir is None:
            raise click.UsageError("--no-store with no --out writes the results nowhere: name --out DIR")
        _analyze_on_dask(db, wait, options, dask_address, parquet_dir, out_dir, not no_store)
        return
    store = open_store(db, create=False, wait=wait)
    try:
        result = analyze(store, options, jobs=jobs, full=full, window_exchanges=window or WINDOW_EXCHANGES)
    except KeyboardInterrupt:
        if _analysis_recorded(db, wait):  # the Ctrl-C came after the last commit: it is done
            raise Interrupted(
                "interrupted after the analysis finished: its results are stored and the store "
                "counts as analyzed"
            ) from None
        raise Interrupted(
            "interrupted: the clients analyzed so far have their new results (a big one read in "
            "time windows: those of the windows done), the others keep their earlier ones; the "
            "store still counts as not analyzed"
        ) from None
    _say_analyzed(result)


def _say_analyzed(result: AnalysisResult) -> None:
    counts = ", ".join(f"{result.by_severity[s]} {s}" for s in reversed(SEVERITIES) if result.by_severity[s])
    scope = (
        ""
        if result.full
        else (
            f" (analyzed the {counted(result.clients_analyzed, 'client')} with new exchanges; "
            f"the others had nothing new)"
        )
    )
    _say(
        f"{counted(result.chain_count, 'chain')}, {counted(result.hop_count, 'hop')}, {counted(result.finding_count, 'finding')}"
        + (f": {counts}" if counts else "")
        + scope
    )


def _analyze_on_dask(
    db: str | None,
    wait: float,
    options: AnalysisOptions,
    address: str,
    parquet_dir: str,
    out_dir: str | None,
    write_back: bool,
) -> None:
    """analyze --dask: export (when DIR is new), analyze on the cluster, write the results."""
    from analyzer.columnar import check_target, export_parquet
    from analyzer.store import open_store

    try:
        from distributed import Client, LocalCluster

        from analyzer import distributed
    except ImportError as exc:
        from analyzer.installed import install_hint

        raise ReportedError(
            f"--dask needs Dask, which is not installed ({exc.name}): install the dask extra: "
            f"{install_hint('dask')}"
        ) from None
    if out_dir is not None:
        check_target(out_dir)
    store = open_store(db, create=False, wait=wait) if write_back or not _has_export(parquet_dir) else None
    if not _has_export(parquet_dir):
        assert store is not None
        exported = export_parquet(store, parquet_dir)
        _say(
            f"exported the store to {exported.directory} ({counted(exported.rows['exchanges'], 'exchange')})"
        )
    counts = distributed.export_counts(parquet_dir)
    if store is not None and write_back:  # refused now, not after the cluster's work
        from analyzer.analysis import check_exchanges

        check_exchanges(store, counts)
    local = re.fullmatch(r"local(?::(\d+))?", address)
    try:
        if local:
            cluster = LocalCluster(
                n_workers=int(local.group(1) or 2),
                threads_per_worker=1,
                processes=True,
                host="127.0.0.1",
                dashboard_address=None,
                silence_logs=logging.ERROR,
            )
            client = Client(cluster)
        else:
            # how long to try: Dask's own setting (DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT, 30 s)
            cluster, client = None, Client(address)
    except (OSError, TimeoutError) as exc:
        raise ReportedError(f"cannot reach the Dask scheduler at {address}: {exc}") from None
    try:
        results = distributed.analyze(distributed.read_exchanges(parquet_dir), options)
        if out_dir is not None and write_back:
            results = distributed.collect(results)  # computed once, for both
        if out_dir is not None:
            written = distributed.write_parquet(results, out_dir)
            _say(f"wrote the chains, hops and findings to {written}")
        if store is not None and write_back:
            _say_analyzed(distributed.store_results(store, results, counts, options))
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def _has_export(directory: str) -> bool:
    path = Path(directory)
    return path.is_dir() and any(path.iterdir())


def _analysis_recorded(db: str | None, wait: float) -> bool:
    """Does the store count as analyzed (its last analysis read its current generation)?"""
    from analyzer.storeread import StoreError, open_reader, store_state

    try:
        with open_reader(db, wait) as reader:
            return store_state(reader, count=False).is_current
    except (StoreError, KeyboardInterrupt):
        return False  # cannot tell: say the cautious thing


# ---- reading commands -------------------------------------------------------------------

FINDING_FORMATS = ("table", "json", "jsonl", "sarif", "junit", "markdown", "html")
SORTS = ("time", "severity", "rule", "confidence", "client")  # analyzer.selection.SORTS


@cli.command("findings")
@reading_options
@click.option(
    "--format", "-f", "format_", type=click.Choice(FINDING_FORMATS), default="table", show_default=True
)
@click.option("--min-severity", type=click.Choice(SEVERITIES), default="info", show_default=True)
@selection_options
@click.option(
    "--rule", "rules", multiple=True, metavar="RULES", help="Only these rules (a view, not a suppression)"
)
@click.option(
    "--client", "clients", multiple=True, metavar="ID", help="Only this client's findings (repeatable)"
)
@click.option(
    "--capture", "captures", multiple=True, type=int, metavar="ID", help="Only this capture's findings"
)
@click.option("--sort", type=click.Choice(SORTS), default="time", show_default=True)
@output_option
def findings_cmd(
    db: str | None,
    no_analyze: bool,
    wait: float,
    format_: str,
    min_severity: str,
    rules: tuple[str, ...],
    clients: tuple[str, ...],
    captures: tuple[int, ...],
    sort: str,
    output: str | None,
    **choosing: Any,
) -> None:
    """List the findings (the store is analyzed first if it changed since the last analysis).

    What the project's configuration suppresses (rules not selected or ignored, redirects
    between third parties of a browser page, ignored hosts and URLs, low confidence) is
    counted on stderr and listed with --show-suppressed. sarif: SARIF 2.1.0; junit: a test
    case per chain; markdown; html: one self-contained file with the plots and a table per rule.
    """
    from analyzer.config import UnknownRule
    from analyzer.model import Severity
    from analyzer.report import chain_records, finding_records, third_party_redirects
    from analyzer.selection import only, sort_records

    chosen = _chosen(**choosing)
    try:
        with _results(db, no_analyze, wait) as (reader, state):
            everything = finding_records(reader)
            chain_list = chain_records(reader) if format_ == "junit" else []
            redirects = third_party_redirects(reader)
        shown, hidden = chosen.selection.apply(everything)
        floor = Severity.parse(min_severity)

        def view(found: list[Record]) -> list[Record]:
            wanted = only(
                found, rules=_rule_list(rules), hosts=chosen.hosts, clients=clients, captures=captures
            )
            return [r for r in wanted if Severity.parse(r["severity"]) >= floor]

        shown, hidden = view(shown), view(hidden)
    except UnknownRule as exc:
        raise UserError(f"unknown rule {exc.name!r} in --rule ({exc.known})") from None
    records = sort_records(shown + hidden if chosen.show_suppressed else shown, sort)
    scope = f" in {counted(state.exchanges, 'exchange')}"
    _emit(output, lambda out: _write_findings(format_, records, chain_list, db, out, scope))
    if output not in (None, "-"):
        click.echo(f"wrote {counted(len(records), 'finding')} to {output}", err=True)
    _say_suppressed(hidden, redirects, chosen)


def _say_suppressed(hidden: list[Record], redirects: tuple[int, int], chosen: Chosen) -> None:
    """One line on stderr: what was suppressed, and the third-party crowd it came from."""
    from analyzer.selection import suppressed_summary

    hops, chains = redirects
    line = suppressed_summary(hidden)
    if chosen.selection.third_party or not hops:
        crowd = ""
    else:
        crowd = f"{counted(hops, 'third-party redirect')} in {counted(chains, 'chain')} between other sites than the page's"
    if line or crowd:
        _say_err("; ".join(p for p in (crowd, line) if p))


def _write_findings(
    format_: str, records: list[Record], chain_list: list[Record], db: str | None, out: IO[str], scope: str
) -> None:
    from analyzer.report import write_json, write_jsonl

    if format_ == "html":
        from analyzer.htmlreport import render  # pandas and matplotlib, only when asked for

        out.write(render(db, records))
    elif format_ == "json":
        write_json(records, out)
    elif format_ == "jsonl":
        write_jsonl(records, out)
    elif format_ == "sarif":
        import json

        from analyzer import exports
        from analyzer.text import json_terminal_safe

        out.write(json_terminal_safe(json.dumps(exports.sarif(records), indent=2, ensure_ascii=False)) + "\n")
    elif format_ == "junit":
        from analyzer import exports

        out.write(exports.junit(records, chain_list))
    elif format_ == "markdown":
        from analyzer import exports

        out.write(exports.markdown(records))
    else:
        _print_findings(records, out, scope)


def _print_findings(records: list[Record], out: IO[str], scope: str) -> None:
    from analyzer.report import print_findings_table

    print_findings_table(records, _console(out), scope)


@cli.command("check")
@reading_options
@click.option(
    "--fail-on",
    type=click.Choice(SEVERITIES),
    help="Lowest severity that fails [default: the configuration's fail-on, else medium]",
)
@baseline_option
@click.option(
    "--write-baseline",
    type=click.Path(dir_okay=False),
    help="Record the current findings as the baseline and exit 0",
)
@click.option("--allow-empty", is_flag=True, help="Pass on a store that holds no exchanges (default: exit 2)")
@selection_options
def check_cmd(
    db: str | None,
    no_analyze: bool,
    wait: float,
    fail_on: str | None,
    baseline: str | None,
    write_baseline: str | None,
    allow_empty: bool,
    **choosing: Any,
) -> None:
    """CI gate: exit 1 when a finding at or above --fail-on is not in the baseline, else 0.

    Suppressed findings (the configuration's select, ignore, ignore-hosts, per-url-ignores,
    min-confidence; third-party redirects of a browser page) never fail; they are counted.
    A store that holds no exchanges fails with exit 2: nothing was captured, so nothing
    was checked (--allow-empty to pass anyway).
    """
    from analyzer import exports
    from analyzer.model import Severity
    from analyzer.report import finding_records, hop_text, third_party_redirects
    from analyzer.selection import only

    chosen = _chosen(**choosing)
    floor = Severity.parse(fail_on or chosen.settings.fail_on or "medium")
    with _results(db, no_analyze, wait) as (reader, state):
        if state.exchanges == 0 and not allow_empty:
            raise UserError(
                f"nothing was captured: the store {_db_shown(db)} holds no exchanges, so nothing was "
                "checked (--allow-empty to pass on an empty store)"
            )
        everything = finding_records(reader)
        redirects = third_party_redirects(reader)
    shown, hidden = chosen.selection.apply(everything)
    shown, hidden = only(shown, hosts=chosen.hosts), only(hidden, hosts=chosen.hosts)
    if write_baseline is not None:
        count = exports.write_baseline(shown, Path(write_baseline))
        _say(f"baseline: {counted(count, 'finding')} recorded in {write_baseline}")
        return
    known = exports.read_baseline(Path(baseline)) if baseline is not None else set()
    failing = exports.gate(shown, floor, known)
    for r in failing:
        _say(f"NEW {r['severity']:6} {r['rule_id']} {r['rule']}: {printable(hop_text(r))}")
    if chosen.show_suppressed:
        for r in hidden:
            _say(
                f"SUPPRESSED {r['severity']:6} {r['rule_id']} {r['rule']}: {printable(hop_text(r))} ({r['suppressed']})"
            )
    quiet = len(shown) - len(failing)
    _say(
        f"check: {counted(len(failing), 'finding')} at or above {floor} not in the baseline"
        f" ({counted(quiet, 'other finding')} known or below the bar"
        + (f", {len(hidden)} suppressed" if hidden else "")
        + f"; {counted(state.exchanges, 'exchange')} checked)"
    )
    _say_suppressed(hidden, redirects, chosen)
    if failing:
        raise click.exceptions.Exit(EXIT_FINDINGS)


@cli.command("chains")
@reading_options
@click.option("--url", help="Only chains with a URL containing this")
@click.option(
    "--chain",
    "chain_ids",
    type=click.IntRange(min=1),
    multiple=True,
    metavar="ID",
    help="Only this chain (its id, as findings give it), repeatable",
)
@click.option(
    "--format", "-f", "format_", type=click.Choice(("tree", "json")), default="tree", show_default=True
)
@click.option(
    "--headers",
    "-v",
    "headers",
    is_flag=True,
    help="Every hop's headers as stored: the request's against its follow-up's (+ added, - dropped, "
    "~ changed), the redirect's response, the headers a finding names marked (JSON: request_headers, "
    "response_headers, header_changes, evidence)",
)
@output_option
def chains_cmd(
    db: str | None,
    no_analyze: bool,
    wait: float,
    url: str | None,
    chain_ids: tuple[int, ...],
    format_: str,
    headers: bool,
    output: str | None,
) -> None:
    """Show chains hop by hop: method, status, body and what changed."""
    from analyzer.report import chain_records, print_chain_trees, write_json

    with _results(db, no_analyze, wait) as (reader, _):
        records = chain_records(reader, url, headers=headers)
    if chain_ids:
        records = [c for c in records if c["chain_id"] in chain_ids]
        missing = sorted(set(chain_ids) - {c["chain_id"] for c in records})
        if missing:
            raise UserError(
                f"no chain {', '.join(map(str, missing))} in {_db_shown(db)}"
                + (f" with a URL containing {url!r}" if url else "")
                + f" (`{command_prefix()} chains --db {shlex.quote(_db_shown(db))}` lists them)"
            )
    if format_ == "json":
        _emit(output, lambda out: write_json(records, out))
    else:
        _emit(output, lambda out: print_chain_trees(records, _console(out), verbose=headers))


@cli.command("export-tests")
@reading_options
@click.option(
    "--chain",
    "chain_ids",
    type=click.IntRange(min=1),
    multiple=True,
    metavar="ID",
    help="This chain (repeatable)",
)
@click.option("--url", help="Chains with a URL containing this")
@click.option("--rule", metavar="SLUG", help="Chains a finding of this rule is about (slug or id)")
@click.option(
    "--base-url",
    metavar="URL",
    help="Send the requests of the chains' first origin here instead "
    "(also settable when the tests run: $REDIRECT_AUDIT_BASE_URL)",
)
@click.option(
    "--output",
    "-o",
    "directory",
    required=True,
    metavar="DIR",
    help="Directory to write the pytest module into (made if missing)",
)
def export_tests_cmd(
    db: str | None,
    no_analyze: bool,
    wait: float,
    chain_ids: tuple[int, ...],
    url: str | None,
    rule: str | None,
    base_url: str | None,
    directory: str,
) -> None:
    """Write contract tests from captured chains: a pytest module, one test per chain.

    Each test re-sends the chain's requests without following redirects, asserts the
    captured redirect status and Location, then sends the follow-up RFC 9110 requires
    and asserts the target accepts it. Credentials are read from environment variables
    named in the module's docstring, never written into it.
    """
    from collections import Counter
    from urllib.parse import urlsplit

    from analyzer import contracts
    from analyzer.detectors import RULES
    from analyzer.report import chain_records, finding_records

    if base_url is not None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise click.BadParameter(
                f"{base_url!r} is not an http(s) origin such as https://staging.example.com",
                param_hint="--base-url",
            )
    wanted_rule = None
    if rule is not None:
        match = [r for r in RULES if rule.lower() in (r.slug, r.id.lower())]
        if not match:
            raise click.BadParameter(
                f"no rule {rule!r} (`{command_prefix()} rules` lists them)", param_hint="--rule"
            )
        wanted_rule = match[0].slug
    with _results(db, no_analyze, wait) as (reader, _):
        chains = chain_records(reader, url)
        if chain_ids:
            chains = [c for c in chains if c["chain_id"] in chain_ids]
        if wanted_rule is not None:
            about = {f["chain_id"] for f in finding_records(reader) if f["rule"] == wanted_rule}
            chains = [c for c in chains if c["chain_id"] in about]
        selection = (
            ", ".join(
                filter(
                    None,
                    [
                        f"chains {', '.join(map(str, chain_ids))}" if chain_ids else "",
                        f"URL containing {url!r}" if url else "",
                        f"rule {wanted_rule}" if wanted_rule else "",
                    ],
                )
            )
            or "every chain"
        )
        if not chains:
            raise UserError(f"no chain in {_db_shown(db)} matches {selection}")
        tests = contracts.load(reader, [c["chain_id"] for c in chains])
    origins = Counter(contracts._origin(t.steps[0].request.url) for t in tests)
    module = contracts.Module(
        selection=selection,
        store=_db_shown(db),
        base_origin=origins.most_common(1)[0][0],
        base_url=base_url.rstrip("/") if base_url else None,
        tests=tests,
    )
    source = contracts.render(module)
    slug = (
        "_".join(
            filter(
                None,
                [
                    "chain_" + "_".join(map(str, chain_ids)) if chain_ids else "",
                    re.sub(r"[^0-9a-z]+", "_", url.lower()).strip("_") if url else "",
                    wanted_rule.replace("-", "_") if wanted_rule else "",
                ],
            )
        )
        or "all"
    )
    target = Path(directory) / f"test_redirects_{slug[:60]}.py"
    if target.exists():
        raise UserError(f"{target} exists; remove it or choose another -o DIR")
    from analyzer.files import private_directory, write_private

    try:
        private_directory(target.parent)
        write_private(target, source)
    except OSError as exc:
        raise UserError(f"{target}: cannot write: {exc.strerror or exc}") from None
    variables = ", ".join(module.secret_origins) or "none"
    _say(f"wrote {target}: {counted(len(tests), 'test')}, one per chain; credentials from: {variables}")
    _say(f"run it: {BASE_ENV_HINT} pytest {shlex.quote(str(target))}")


BASE_ENV_HINT = "REDIRECT_AUDIT_BASE_URL=https://your-test-environment"


@cli.command("clients")
@reading_options
@click.option(
    "--format", "-f", "format_", type=click.Choice(("table", "json")), default="table", show_default=True
)
@output_option
def clients_cmd(db: str | None, no_analyze: bool, wait: float, format_: str, output: str | None) -> None:
    """Per-client conformance: what each client did on every (status, method) it met, next to RFC 9110 / Fetch."""
    from analyzer.conformance import client_rows
    from analyzer.report import print_conformance_table, write_json

    with _results(db, no_analyze, wait) as (reader, _):
        rows = client_rows(reader)
    if format_ == "json":
        _emit(output, lambda out: write_json(rows, out))
    else:
        _emit(output, lambda out: print_conformance_table(rows, _console(out)))


@cli.command("export")
@click.argument("directory", metavar="DIR")
@click.option(
    "--format", "-f", "format_", type=click.Choice(("parquet",)), default="parquet", show_default=True
)
@reading_options
def export_cmd(directory: str, format_: str, db: str | None, no_analyze: bool, wait: float) -> None:
    """Write the store as Parquet under DIR (a new or empty directory): exchanges, hops, chains
    and findings partitioned by capture date, and the captures, for DuckDB, Spark, Trino or pandas."""
    from analyzer.columnar import check_target, export_parquet
    from analyzer.store import open_store

    check_target(directory)  # before any work
    with _results(db, no_analyze, wait):
        pass  # current results first
    store = open_store(db, create=False, wait=wait)
    try:
        result = export_parquet(store, directory)
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted: nothing was written to {directory}") from None
    finally:
        store.close()
    counts = ", ".join(f"{n} {name}" for name, n in result.rows.items())
    _say(f"wrote {counts} to {directory} ({counted(result.days, 'capture date')})")


@cli.group("captures", invoke_without_command=True)
@reading_options
@click.option(
    "--format", "-f", "format_", type=click.Choice(("table", "json")), default="table", show_default=True
)
@click.pass_context
def captures_cmd(ctx: click.Context, db: str | None, no_analyze: bool, wait: float, format_: str) -> None:
    """List what the store holds: each capture (HAR file, flow dump, proxy run) with its
    exchanges and time span. `captures remove ID...` removes captures."""
    if ctx.invoked_subcommand is not None:
        return
    from analyzer.report import capture_records, print_capture_table, write_json
    from analyzer.storeread import open_reader

    with open_reader(db, wait) as reader:
        records = capture_records(reader)
    if format_ == "json":
        _emit(None, lambda out: write_json(records, out))
    else:
        _emit(None, lambda out: print_capture_table(records, _console(out), _db_shown(db)))


@captures_cmd.command("remove")
@click.argument("ids", nargs=-1, required=True, type=click.IntRange(min=1), metavar="ID...")
@db_option
@wait_option
def captures_remove_cmd(ids: tuple[int, ...], db: str | None, wait: float) -> None:
    """Remove captures and their exchanges (ids from `captures`); the results follow on the next read."""
    from analyzer.store import open_store, remove_captures

    store = open_store(db, create=False, wait=wait)
    try:
        with store.begin() as conn:
            missing = remove_captures(conn, list(ids))
    except KeyboardInterrupt:
        raise Interrupted("interrupted: nothing was removed") from None
    if missing:
        raise UserError(
            f"no capture {', '.join(map(str, missing))} in {_db_shown(db)}; nothing was removed "
            f"(`{command_prefix()} captures --db {shlex.quote(_db_shown(db))}` lists them)"
        )
    listed = ", ".join(map(str, ids))
    _say(
        f"removed {'capture' if len(ids) == 1 else 'captures'} {listed} and their exchanges from {_db_shown(db)}"
    )


@cli.group("db")
def db_group() -> None:
    """The store's schema: `db current` shows it, `db upgrade` brings a store made by an older
    release up to this one (the only command that alters a store's schema)."""


@db_group.command("current")
@db_option
@wait_option
@click.option(
    "--format", "-f", "format_", type=click.Choice(("text", "json")), default="text", show_default=True
)
def db_current_cmd(db: str | None, wait: float, format_: str) -> None:
    """Show the store's schema version and migration revision, and whether it is this release's."""
    from analyzer.migrate import schema_state
    from analyzer.storeread import SCHEMA_VERSION

    state = schema_state(db, wait)
    if format_ == "json":
        from analyzer.report import write_json

        _emit(
            None,
            lambda out: write_json(
                {
                    "store": _db_shown(db),
                    "schema_version": state.version,
                    "revision": state.revision,
                    "head": state.head,
                    "current": state.current,
                },
                out,
            ),
        )
        return
    revision = state.revision or "none (made before migrations)"
    verdict = (
        "up to date"
        if state.current
        else (
            f"outdated: `{command_prefix()} db upgrade --db {shlex.quote(_db_shown(db))}` upgrades it"
            if state.version < SCHEMA_VERSION
            else "newer than this release"
        )
    )
    _say(
        f"{_db_shown(db)}: schema version {state.version}, revision {revision} "
        f"(this release: {SCHEMA_VERSION}, revision {state.head}); {verdict}"
    )


@db_group.command("upgrade")
@db_option
@wait_option
def db_upgrade_cmd(db: str | None, wait: float) -> None:
    """Upgrade the store's schema to this release's (one transaction: all or nothing)."""
    from analyzer.migrate import upgrade

    try:
        before, after = upgrade(db, wait)
    except KeyboardInterrupt:
        raise Interrupted("interrupted: the store was left as it was") from None
    if before.current:
        _say(f"{_db_shown(db)} is up to date (schema version {after.version}, revision {after.head})")
    else:
        _say(
            f"upgraded {_db_shown(db)} from schema version {before.version} to {after.version} "
            f"(revision {before.revision or 'none'} -> {after.revision})"
        )


@cli.command("rules")
@click.argument("rule", required=False)
@click.option(
    "--format",
    "-f",
    "fmt",
    type=click.Choice(["text", "markdown"]),
    default="text",
    show_default=True,
    help="markdown: the rules page (docs/rules.md) with references linked.",
)
@click.option(
    "--examples",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="With --format markdown: a directory of rule fixtures (HAR files with log._expect); "
    "each rule's page shows the finding it produced on the first one that fires it.",
)
@click.option("--all", "everything", is_flag=True, help="Every rule's full text, not the one-line table.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write here instead of stdout.")
def rules_cmd(
    rule: str | None, fmt: str, everything: bool, examples: Path | None, output: str | None
) -> None:
    """The rules, one line each (id, slug, severity, what it finds); one rule in full with
    `rules RA102` or `rules dropped-body`, every one in full with --all."""
    from analyzer.detectors import RULES

    chosen: Sequence[Rule] = RULES
    if rule is not None:
        chosen = [r for r in RULES if rule.lower() in (r.id.lower(), r.slug)]
        if not chosen:
            import difflib

            names = [r.id for r in RULES] + [r.slug for r in RULES]
            close = difflib.get_close_matches(rule, names, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise click.BadParameter(
                f"no rule {rule!r}.{hint} (`redirect-audit rules` lists them all)", param_hint="'RULE'"
            )
    if examples is not None and fmt != "markdown":
        raise click.UsageError("--examples goes with --format markdown")
    if fmt == "markdown":
        from analyzer import ruledocs

        found = ruledocs.collect_examples(chosen, examples) if examples is not None else None
        text = ruledocs.render(chosen, found)
    elif rule is None and not everything:
        slug_width = max(len(r.slug) for r in chosen)
        lines = [f"{'ID':<6} {'RULE':<{slug_width}} {'SEVERITY':<8} WHAT IT FINDS"]
        lines += [f"{r.id:<6} {r.slug:<{slug_width}} {r.severity!s:<8} {r.summary}" for r in chosen]
        lines.append("\n`redirect-audit rules RA102` shows one rule in full; --all shows every one.")
        text = "\n".join(lines) + "\n"
    else:
        text = "\n".join(
            f"{r.id} {r.slug} (default severity {r.severity})\nFix: {r.fix}\n\n{r.doc.rstrip()}\n"
            for r in chosen
        )
    _emit(output, lambda out: out.write(text))


# ---- plumbing ---------------------------------------------------------------------------


@contextmanager
def _results(db: str | None, no_analyze: bool, wait: float) -> Iterator[tuple[Reader, StoreState]]:
    """(reader, state) on an existing store whose results are current (see analyzer.current)."""
    from analyzer.current import ANALYZE_WHEN_STALE, open_current

    ANALYZE_WHEN_STALE.set(not no_analyze)  # for the frames a command reads, too
    reader, state = open_current(db, wait=wait)
    try:
        yield reader, state
    finally:
        reader.close()


def _db_shown(db: str | None) -> str:
    from analyzer.storeread import shown

    return shown(db)


def command_prefix() -> str:
    """How the user ran us, so that a printed hint works when pasted: under `uv run` the
    command is not on PATH, so hints say `uv run redirect-audit`."""
    return "uv run redirect-audit" if os.environ.get("UV_RUN_RECURSION_DEPTH") else "redirect-audit"


@functools.cache
def _console_type() -> type[Console]:
    from rich.console import Console

    class PipeAwareConsole(Console):
        def on_broken_pipe(self) -> None:
            # rich's own exits with status 1; a closed pipe is 141 here, whatever the format
            raise PipeClosed()

    return PipeAwareConsole


def _console(file: IO[str]) -> Console:
    """A rich console for `file`: on a terminal as usual; elsewhere nothing is wrapped,
    coloured or highlighted (FORCE_COLOR keeps colour, NO_COLOR removes it anywhere)."""
    console = _console_type()
    tty = file.isatty() if hasattr(file, "isatty") else False
    colour = (tty or bool(os.environ.get("FORCE_COLOR"))) and not os.environ.get("NO_COLOR")
    if tty:
        return console(file=file, highlight=False, emoji=False, no_color=not colour)
    return console(
        file=file,
        highlight=False,
        emoji=False,
        width=1 << 16,
        soft_wrap=True,
        force_terminal=colour,
        color_system="standard" if colour else None,
    )


def _emit(output: str | None, write: Callable[[IO[str]], object]) -> None:
    """Run a writer into stdout (None, '-') or into a file, which is only written once the
    whole output is ready (a failure leaves no half file behind)."""
    if output in (None, "-"):
        try:
            write(sys.stdout)
            sys.stdout.flush()
        except BrokenPipeError:
            raise PipeClosed() from None
        return
    import io

    from analyzer.files import write_private

    buffer = io.StringIO()
    write(buffer)
    try:
        write_private(output, buffer.getvalue())
    except OSError as exc:
        raise UserError(f"{output}: cannot write: {exc.strerror or exc}") from None


def _say(line: str) -> None:
    try:
        click.echo(line)
    except BrokenPipeError:
        raise PipeClosed() from None


def _error(message: str) -> None:
    """One line on stderr, never wrapped."""
    click.echo(f"redirect-audit: error: {printable(' '.join(str(message).split()))}", err=True)


def main(argv: list[str] | None = None) -> None:
    """Run a command; see the module docstring for what the user sees on each kind of failure."""
    try:
        code = cli.main(args=argv, prog_name="redirect-audit", standalone_mode=False)
    except click.exceptions.ClickException as exc:  # a usage mistake: usage line, error, hint
        exc.show()
        code = exc.exit_code
    except click.exceptions.Exit as exc:
        code = exc.exit_code
    except click.exceptions.Abort:  # click's name for Ctrl-C outside what a command handles itself
        click.echo("redirect-audit: interrupted", err=True)
        code = EXIT_INTERRUPTED
    except Interrupted as exc:
        click.echo(f"redirect-audit: {exc}", err=True)
        code = EXIT_INTERRUPTED
    except PipeClosed:
        _quiet_stdout()
        code = EXIT_PIPE_CLOSED
    except ReportedError as exc:
        _error(str(exc))
        code = EXIT_ERROR
    except OSError as exc:
        _error(f"{exc.filename or ''}: {exc.strerror or exc}" if exc.filename else str(exc.strerror or exc))
        code = EXIT_ERROR
    except Exception as exc:  # a bug of ours: still one line, the details on request
        if os.environ.get(DEBUG_ENV):
            raise
        _error(f"internal error: {type(exc).__name__}: {exc} (set {DEBUG_ENV}=1 for the traceback)")
        code = EXIT_ERROR
    sys.exit(code if isinstance(code, int) else 0)


def _quiet_stdout() -> None:
    """After a closed pipe, point stdout at /dev/null so the interpreter's last flush is silent."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


if __name__ == "__main__":
    from analyzer.__main__ import main as entry

    entry()
