"""redirect-audit for pytest: every redirect a test's traffic met, judged, and put on the test.

Off unless asked for: `pytest --redirect-audit[=DB]`, or `redirect_audit = true` in the
ini file (`redirect_audit_db = URL` names the store there). Then:

* one recorder (mitmdump with the recorder addon, on a free loopback port) per session,
  or per pytest-xdist worker, started for the first subprocess a test starts (none if no
  test does). The test process's own clients are recorded in process
  (inprocess.py: http.client, httpx, aiohttp; no proxy in their path) and handed to the
  tool in batches, which stores them as the recorder would; the subprocesses tests start
  get the recorder's environment, as `redirect-audit run` gives it, and go through it
  (`--redirect-audit-mode=proxy`: the test process too). Each worker's traffic carries
  its own client label (`pytest-gw0-…`), so two workers are never linked into one chain;
* each test's start, end and outcome are stored (`test_runs`), and every hop and
  finding is attributed to the test during which it happened;
* a terminal summary: what was recorded and what could not be seen, findings grouped by
  test, the hop in one line each, and the command that shows the chain;
* `--redirect-audit-fail-on=SEVERITY`: a test during which a new finding at or above it
  happened (not in `--redirect-audit-baseline FILE`) fails, with the finding in its report;
* the `redirect_audit` fixture: `findings()`, `chains()` and `assert_no_findings()`
  about the current test alone, after a flush of the recorder, so that what the test
  sent is stored before it is judged.

Without a DB the exchanges go to a fresh store in a new temporary directory, printed
in the summary; a session that recorded nothing exits 2 (`--redirect-audit-allow-empty`).
Under `redirect-audit run -- pytest` the plugin is on without being asked, quietly (labels
and attribution; `run` sums up), and uses the recorder `run` started and `run`'s store.

The recorder, the store and the rules are redirect-audit's (tool.py finds it; its half of
this plugin is analyzer/testbackend.py): this package imports pytest and the standard
library only, and nothing at all until it is enabled.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
import uuid
from collections.abc import Generator
from pathlib import Path
from typing import Any

import pytest

from pytest_redirect_audit.tool import Tool, ToolError

SEVERITIES = ("info", "low", "medium", "high")
WORKER_MAIN = "main"
PENDING_MAX = 500  # finished tests (or captures) held before they are handed over at once
STATE = pytest.StashKey["AuditSession"]()
UNPROXIED = pytest.StashKey[list[str]]()  # the proxy variables a test ran without
DB_SUFFIXES = (".db", ".sqlite", ".sqlite3")
GATE_ALONE = "alone"  # the test passed on its own; the gate failed it
GATE_TOO = "too"  # the test failed on its own, and the gate failed it as well
PROXY_ENV = "REDIRECT_AUDIT_RECORDER"  # under `redirect-audit run`: its recorder (no `_PROXY` ending: urllib would take it for a proxy)
DB_ENV = "REDIRECT_AUDIT_DB"  # and its store
RUNTIMES_ENV = "REDIRECT_AUDIT_RUNTIMES"  # where `run` collects what each runtime it started says
PROXY_VARS = ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup(
        "redirect-audit", "redirect-audit: judge the redirects each test's HTTP traffic met"
    )
    group.addoption(
        "--redirect-audit",
        dest="redirect_audit",
        nargs="?",
        const="",
        default=None,
        metavar="DB",
        help="Record the session's HTTP(S) traffic through a redirect-audit recorder and judge its "
        "redirects per test; DB is the store (SQLAlchemy URL or file path; default: a fresh "
        "store in a temporary directory)",
    )
    group.addoption(
        "--redirect-audit-fail-on",
        dest="redirect_audit_fail_on",
        choices=SEVERITIES,
        default=None,
        metavar="SEVERITY",
        help="Fail a test during which a new finding at or above SEVERITY "
        f"happened ({', '.join(SEVERITIES)})",
    )
    group.addoption(
        "--redirect-audit-mode",
        dest="redirect_audit_mode",
        choices=("in-process", "proxy"),
        default="in-process",
        help="How the test process's own HTTP clients are recorded: in-process (default; "
        "http.client, urllib, urllib3, requests, httpx and aiohttp, with no proxy in their path) or "
        "proxy (the proxy variables and a CA bundle, as for the subprocesses tests start)",
    )
    group.addoption(
        "--redirect-audit-allow-empty",
        dest="redirect_audit_allow_empty",
        action="store_true",
        default=False,
        help="A session that recorded no exchange passes (by default it exits 2: nothing was judged)",
    )
    group.addoption(
        "--redirect-audit-keep-bodies",
        dest="redirect_audit_keep_bodies",
        action="store_true",
        default=False,
        help="Keep request bodies (up to 64 KiB, secret fields of JSON and forms as keyed fingerprints), "
        "as export-tests needs them for the contract test of a redirected POST; by default only "
        "their length, keyed digest and type are stored",
    )
    group.addoption(
        "--redirect-audit-baseline",
        dest="redirect_audit_baseline",
        default=None,
        metavar="FILE",
        help="Findings recorded in this baseline (redirect-audit check --write-baseline) are known: "
        "they fail no test",
    )
    group.addoption(
        "--redirect-audit-select",
        dest="redirect_audit_select",
        action="append",
        default=[],
        metavar="RULES",
        help="Only these rules (ids, names or id prefixes, comma-separated; replaces the configuration's select)",
    )
    group.addoption(
        "--redirect-audit-ignore",
        dest="redirect_audit_ignore",
        action="append",
        default=[],
        metavar="RULES",
        help="Suppress these rules too (comma-separated)",
    )
    group.addoption(
        "--redirect-audit-min-confidence",
        dest="redirect_audit_min_confidence",
        type=float,
        default=None,
        metavar="0-1",
        help="Suppress findings less sure than this",
    )
    group.addoption(
        "--redirect-audit-host",
        dest="redirect_audit_host",
        action="append",
        default=[],
        metavar="GLOB",
        help="Only findings whose redirect starts or ends on this host fail tests (repeatable)",
    )
    group.addoption(
        "--redirect-audit-config",
        dest="redirect_audit_config",
        default=None,
        metavar="FILE",
        help="redirect-audit's configuration file (default: redirect-audit.toml or pyproject.toml's "
        "[tool.redirect-audit], found from the rootdir up)",
    )
    group.addoption(
        "--redirect-audit-tool",
        dest="redirect_audit_tool",
        default=None,
        metavar="CMD",
        help="The redirect-audit command to record and judge with (default: $REDIRECT_AUDIT_TOOL, "
        "redirect-audit installed here, `redirect-audit` on PATH, then uvx or pipx run)",
    )
    parser.addini(
        "redirect_audit", "Turn redirect-audit's recorder on for every run", type="bool", default=False
    )
    parser.addini(
        "redirect_audit_db", "Store for redirect-audit (default: a fresh temporary store)", default=""
    )


def _enabled(config: pytest.Config) -> bool:
    return _asked(config) or _under_run()


def _asked(config: pytest.Config) -> bool:
    return config.getoption("redirect_audit") is not None or bool(config.getini("redirect_audit"))


def _under_run() -> bool:
    """Started by `redirect-audit run` (its recorder and store in the environment): the
    tests are the unit there too, each with its own label, whether asked for or not."""
    return bool(os.environ.get(PROXY_ENV) and os.environ.get(DB_ENV))


def _take_run_proxies() -> dict[str, str]:
    """Under `run`, its proxy variables, taken out of this process's environment the moment
    the plugin loads: its own clients are recorded in process, and what snapshots the
    environment early must not keep them (wsgiref's handlers copy os.environ into every
    request's WSGI environ, where HTTP_PROXY reads as a `Proxy` request header to the
    server under test). Given back at the session's end, and to every subprocess."""
    if not _under_run():
        return {}
    return {name: os.environ.pop(name) for name in PROXY_VARS if name in os.environ}


def _scrub_snapshots(names: list[str]) -> None:
    """The copies of the environment made before the plugin loaded: wsgiref's handlers'."""
    import sys

    handlers = sys.modules.get("wsgiref.handlers")
    snapshot = getattr(getattr(handlers, "BaseHandler", None), "os_environ", None)
    if isinstance(snapshot, dict):
        for name in names:
            snapshot.pop(name, None)


def _worker(config: pytest.Config) -> str:
    return str(getattr(config, "workerinput", {}).get("workerid", WORKER_MAIN))


def _xdist_controller(config: pytest.Config) -> bool:
    return (
        not hasattr(config, "workerinput")
        and getattr(config.option, "dist", "no") != "no"
        and bool(getattr(config.option, "numprocesses", None) or getattr(config.option, "tx", None))
    )


def _given_db(config: pytest.Config) -> str | None:
    """The store asked for, if any. `--redirect-audit tests/` puts a test path where the
    store would go (the option's value is optional): a value that is neither a URL nor a
    database file name is given back to pytest as the path it was."""
    value = config.getoption("redirect_audit")
    if value and "://" not in value and not value.endswith(DB_SUFFIXES):
        if config.args_source == pytest.Config.ArgsSource.ARGS:
            config.args.append(value)
        else:
            config.args[:] = [value]
        config.option.redirect_audit = value = ""
    return value or config.getini("redirect_audit_db") or None


_RUN_PROXIES = _take_run_proxies()  # at import: before the test modules are


@pytest.hookimpl(trylast=True)
def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "redirect_audit(expect=[RULES], ignore=[RULES]): findings of these rules are expected during "
        "the test (and fail it when they do not happen) or ignored (redirect-audit)",
    )
    if _RUN_PROXIES and config.getoption("redirect_audit_mode") == "proxy":
        os.environ.update(_RUN_PROXIES)  # asked for: this process goes through `run`'s proxy too
        _RUN_PROXIES.clear()
    if not _enabled(config):
        return
    workerinput = getattr(config, "workerinput", None)
    if workerinput is not None and "redirect_audit_db" in workerinput:
        db, session, fresh = (
            workerinput["redirect_audit_db"],
            workerinput["redirect_audit_session"],
            workerinput["redirect_audit_fresh"],
        )
    else:
        db = _given_db(config)
        session = uuid.uuid4().hex[:8]
        fresh = False
        if db is None and _under_run():
            db = os.environ[DB_ENV]  # under `redirect-audit run`: its store and its recorder
        if db is None:
            db = str(Path(tempfile.mkdtemp(prefix="redirect-audit-pytest-")) / "capture.db")
            fresh = True
    quiet = not _asked(config) and not (workerinput or {}).get("redirect_audit_asked", False)
    audit = AuditSession(config, db=db, session=session, fresh=fresh, quiet=quiet)
    config.stash[STATE] = audit
    config.pluginmanager.register(audit, "redirect-audit-session")


def _rules(values: list[str]) -> list[str]:
    return [v.strip() for value in values for v in value.split(",") if v.strip()]


def _marked(item: pytest.Item) -> tuple[list[str], list[str]]:
    """(expect, ignore) of the test's `redirect_audit` markers (closest first, all merged)."""
    expect: list[str] = []
    ignore: list[str] = []
    for marker in item.iter_markers("redirect_audit"):
        for name, into in (("expect", expect), ("ignore", ignore)):
            value = marker.kwargs.get(name, ())
            into += [value] if isinstance(value, str) else list(value)
    return expect, ignore


def _usage(exc: ToolError) -> pytest.UsageError:
    message = str(exc)
    return pytest.UsageError(
        message if message.startswith("--redirect-audit") else f"--redirect-audit: {message}"
    )


class AuditSession:
    """The plugin's state for one pytest process (the controller, or one xdist worker)."""

    def __init__(self, config: pytest.Config, *, db: str, session: str, fresh: bool, quiet: bool = False):
        from pytest_redirect_audit import tool

        self.config = config
        # Under `run` without --redirect-audit: labels and attribution only; `run` sums up
        # (this session's findings, its exit status), with the tests that ran unproxied.
        self.quiet = quiet
        self.db = db
        self.session = session
        self.fresh = fresh
        self.fail_on: str | None = config.getoption("redirect_audit_fail_on")
        self.worker = _worker(config)
        self.controller = _xdist_controller(config)  # workers record; the controller only sums up
        self.label = f"pytest-{self.worker}-{session}"
        self.recording = False  # a recorder was started (or attached to) for this process
        self.attached = False  # the recorder is `run`'s: never stopped here
        self.saved_env: dict[str, str | None] = {}
        self.current: dict[str, Any] | None = None  # the running test: nodeid, row id, start
        self.outcomes: dict[str, str] = {}
        self.tests = 0  # tests started in this process
        self.allow_empty = bool(config.getoption("redirect_audit_allow_empty"))
        self.given_env: dict[str, str] = {}  # the proxy variables as the recorder set them
        self.unproxied: dict[str, list[str]] = {}  # test -> proxy variables it ran without
        self.gated: dict[str, str] = {}  # test -> GATE_ALONE or GATE_TOO: how the gate failed it
        self.tls_refused: dict[str, int] = {}  # host -> handshakes refused (every worker's)
        self.tls_upstream_failed: dict[str, int] = {}
        self.seen: int | None = None  # clients the session recorded, once it ended
        self.recorder_lost = False  # the recorder stopped answering before the session ended
        self.in_process = config.getoption("redirect_audit_mode") == "in-process"
        self.sink: Any = None  # inprocess.Sink, once recording in process
        self.pending_runs: list[dict[str, Any]] = []  # finished tests' rows not stored yet (in process)
        self.children = False  # a subprocess was started (in process: the recorder then labels per test)
        self.starting = False  # the recorder was launched and has not been waited for yet
        self._changes: dict[str, str | None] | None = None  # a subprocess's environment, on top
        self.settled = False  # the answers to hello, configure and start were read
        self.refused = False  # the tool refused the session (a usage error was raised)
        self.config_file: str | None = None  # the configuration file the tool found, once settled
        try:
            self.tool: Tool = tool.find(config.getoption("redirect_audit_tool"))
            # asked now, answered while pytest collects (_settle); a tool that is gone already
            # (it failed at once) is said here, as at any later call
            self.tool.send("hello")
            self.tool.send(
                "configure",
                db=db,
                session=session,
                fresh=fresh,
                baseline=config.getoption("redirect_audit_baseline"),
                config_dir=str(config.rootpath),
                config_file=config.getoption("redirect_audit_config"),
                select=_rules(config.getoption("redirect_audit_select")),
                ignore=_rules(config.getoption("redirect_audit_ignore")),
                min_confidence=config.getoption("redirect_audit_min_confidence"),
                hosts=config.getoption("redirect_audit_host"),
            )
        except ToolError as exc:
            raise _usage(exc) from None

    def call(self, name: str, **args: Any) -> Any:
        self._settle()
        return self.tool.call(name, **args)

    def _settle(self) -> None:
        """Read the tool's answers to the session's first calls (hello and configure, sent
        at configure; start, at session start), as late as possible: the tool imports and
        opens the store while pytest collects. Its refusal (a store that cannot be opened,
        a baseline that does not parse, another protocol) is a usage error still."""
        if self.settled:
            return
        self.settled = True
        try:
            answers = self.tool.drain()
        except ToolError as exc:
            self.refused = True  # nothing more is asked of it: the session ends with the error
            raise _usage(exc) from None
        configured = answers.get("configure") or {}
        self.config_file = configured.get("config")  # the project's configuration, if one was found
        if self.fail_on is None and configured.get("fail_on"):
            self.fail_on = configured["fail_on"]  # the project's configuration says it
        started = answers.get("start")
        if started is not None:
            self.recording, self.attached = True, bool(started["attached"])
            self.starting = self.in_process and not self.attached  # it boots while the tests run

    @pytest.hookimpl(tryfirst=True)
    def pytest_collection_finish(self, session: pytest.Session) -> None:
        self._settle()  # before the first test

    # ---- xdist -----------------------------------------------------------------------------

    @pytest.hookimpl(optionalhook=True)
    def pytest_configure_node(self, node: Any) -> None:  # xdist's WorkerController
        node.workerinput["redirect_audit_db"] = self.db
        node.workerinput["redirect_audit_session"] = self.session
        node.workerinput["redirect_audit_fresh"] = self.fresh
        node.workerinput["redirect_audit_asked"] = not self.quiet

    # ---- the recorder ------------------------------------------------------------------------

    def pytest_sessionstart(self, session: pytest.Session) -> None:
        if self.controller:
            return
        try:
            self.tool.send(  # answered while pytest collects (_settle)
                "start",
                label=self.label,
                in_process=self.in_process,
                confdir=os.environ.get("REDIRECT_AUDIT_CONFDIR", "~/.mitmproxy"),
                keep_bodies=bool(self.config.getoption("redirect_audit_keep_bodies")),
            )
        except ToolError as exc:  # gone already: said as its first answers would have said it
            self.refused = True
            raise _usage(exc) from None
        if self.in_process:
            self._record_in_process()
            return
        try:
            env = self.call("environ", base=dict(os.environ))
        except ToolError as exc:
            raise _usage(exc) from None
        self.given_env = {name: env[name] for name in PROXY_VARS if name in env}
        for name in set(env) | set(os.environ):
            if env.get(name) != os.environ.get(name):
                self.saved_env[name] = os.environ.get(name)
                if name in env:
                    os.environ[name] = env[name]
                else:
                    del os.environ[name]

    def _record_in_process(self) -> None:
        """This process's clients are recorded where they run; the subprocesses tests start
        get the recorder proxy's environment. This process keeps its own environment, less
        the proxy variables `run` put in it (its clients would otherwise go to the proxy)."""
        from pytest_redirect_audit import inprocess

        if _under_run():
            self.saved_env.update(_RUN_PROXIES)
            for name in PROXY_VARS:
                if name in os.environ:
                    self.saved_env[name] = os.environ.pop(name)
            _scrub_snapshots(sorted(self.saved_env))
        self.sink = inprocess.Sink(self.label)
        inprocess.install(self.sink)
        inprocess.give_children(self._child_env, on_start=self._children_started)

    def _child_env(self) -> dict[str, str | None]:
        """What a subprocess's environment needs on top of this process's: the recorder's
        (computed once it is up: the CA bundle and the label's port come from it)."""
        if self._changes is None:
            try:
                env = self.call("environ", base=dict(os.environ))
            except ToolError as exc:
                raise _usage(exc) from None
            changes: dict[str, str | None] = {
                name: env.get(name)
                for name in set(env) | set(os.environ)
                if env.get(name) != os.environ.get(name)
            }
            for (
                name
            ) in self.saved_env:  # `run`'s proxy variables, taken out here: the child gets the recorder's
                changes[name] = env.get(name)
            self._changes = changes
        return self._changes

    def ensure_ready(self) -> None:
        """Start the recorder and wait for it, the first time it is needed (a subprocess)."""
        self._settle()
        if self.starting:
            self.starting = False
            try:
                self.call("ready")
            except ToolError as exc:
                raise _usage(exc) from None

    @pytest.hookimpl(tryfirst=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        """Stop this process's recorder (it stores what it holds) before the summary reads the
        store; then, in the process that sums up, learn what the session recorded: a session
        that recorded nothing exits 2 (unless allowed), since nothing was judged."""
        for name, value in self.saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        self.saved_env = {}
        if not self.settled:  # collection never finished: the first answers are read now
            try:
                self._settle()
            except pytest.UsageError:
                pass  # said where it was raised
        if self.refused:
            if self.sink is not None:
                from pytest_redirect_audit import inprocess

                inprocess.uninstall()
            return
        if self.sink is not None:
            from pytest_redirect_audit import inprocess

            try:
                self.write_pending()
            except ToolError:
                self.recorder_lost = True
            finally:
                inprocess.uninstall()
        if self.recording:
            try:
                self._add_tls(self.call("flush"))
                # it has stored everything (the flush): it winds down while the summary is
                # read, and pytest_unconfigure waits for it
                self.tool.send("stop", wait=False)
            except ToolError:
                self.recorder_lost = True  # it stopped answering: what it held may be missing
        workeroutput = getattr(self.config, "workeroutput", None)
        if workeroutput is not None:  # an xdist worker: the controller sums up
            workeroutput["redirect_audit_tls"] = [self.tls_refused, self.tls_upstream_failed]
            return
        if self.quiet:
            self._tell_run()
            return
        try:
            self.seen = int(self.call("seen", labels=[self.label]))
        except ToolError:
            return  # said in the summary
        if not self.seen and not self.allow_empty and session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.INTERRUPTED  # 2, as `redirect-audit run` exits

    def _tell_run(self) -> None:
        """Leave `run` a line about this session (as the Node preload does about each process):
        the tests that ran with the proxy variables removed go into its summary."""
        where = os.environ.get(RUNTIMES_ENV)
        if not where or not Path(where).is_dir():
            return
        line = {
            "runtime": f"pytest {pytest.__version__} (Python {platform.python_version()})",
            "pid": os.getpid(),
            "script": "pytest",
            "tests": self.tests or len(self.outcomes),
            "unproxied": sorted(self.unproxied),
        }
        fd = os.open(Path(where) / f"pytest-{os.getpid()}.json", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(json.dumps(line) + "\n")

    def _add_tls(self, flushed: dict[str, Any]) -> None:
        for mine, theirs in (
            (self.tls_refused, flushed.get("tls_refused") or {}),
            (self.tls_upstream_failed, flushed.get("tls_upstream_failed") or {}),
        ):
            for host, count in theirs.items():
                mine[host] = mine.get(host, 0) + int(count)

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node: Any, error: object) -> None:  # xdist: a worker finished
        refused, upstream = getattr(node, "workeroutput", {}).get("redirect_audit_tls", ({}, {}))
        self._add_tls({"tls_refused": refused, "tls_upstream_failed": upstream})

    def pytest_unconfigure(self, config: pytest.Config) -> None:
        self.tool.close()  # the recorder stopped, its working files removed

    # ---- each test -------------------------------------------------------------------------

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_protocol(
        self, item: pytest.Item, nextitem: pytest.Item | None
    ) -> Generator[None, object, object]:
        if not self.recording:
            return (yield)
        self.tests += 1
        client = f"{self.label}-t{self.tests}"  # this test's own client: chains never cross tests
        if self.sink is not None:
            return (yield from self._in_process_test(item, client))
        self.tool.send("relabel", label=self.label, to=client)
        started = time.time()
        row = self.call(
            "hand_over", captures=[], runs=[], current=self._run_row(item.nodeid, client, started)
        )
        self.current = {"nodeid": item.nodeid, "row": row, "started": started, "client": client}
        try:
            return (yield)
        finally:
            self.current = None
            self.tool.send("relabel", label=self.label, to=None)  # between tests: the worker's own label
            self.tool.send(
                "end_run",
                row=row,
                values={"ended_at": time.time(), "outcome": self.outcomes.get(item.nodeid, "passed")},
            )

    def _in_process_test(self, item: pytest.Item, client: str) -> Generator[None, object, object]:
        """A test whose clients are recorded in process: its captures carry its label, so the
        recorder is asked for nothing per test (its traffic and its `test_runs` row are handed
        over in batches, and before anything reads the store) unless the test starts a
        subprocess, which sends through the recorder and needs the test's label there too."""
        assert self.sink is not None
        self.sink.label = client
        started = time.time()
        self.current = {"nodeid": item.nodeid, "row": None, "started": started, "client": client}
        current = self.current
        try:
            return (yield)
        finally:
            self.current = None
            self.sink.label = self.label
            if current.get("relabelled"):
                self.tool.send("relabel", label=self.label, to=None)
            ended = {"ended_at": time.time(), "outcome": self.outcomes.get(item.nodeid, "passed")}
            if current["row"] is not None:  # written already, for a read during the test
                self.tool.send("end_run", row=current["row"], values=ended)
            else:
                self.pending_runs.append({**self._run_row(item.nodeid, client, started), **ended})
            if len(self.pending_runs) >= PENDING_MAX or self.sink.waiting() >= PENDING_MAX:
                self.write_pending()

    def _run_row(self, nodeid: str, client: str, started: float) -> dict[str, Any]:
        return {
            "session": self.session,
            "nodeid": nodeid,
            "worker": self.worker,
            "client": client,
            "recorder": self.label,
            "started_at": started,
        }

    def write_pending(self) -> None:
        """Hand over the captures and the finished tests' rows waiting here; the running
        test's row too, so that what reads the store now finds it."""
        if self.sink is None:
            return
        captures = [c.as_json() for c in self.sink.take()]
        rows, self.pending_runs = self.pending_runs, []
        current = self.current
        new = current is not None and current["row"] is None
        if not captures and not rows and not new:
            return
        row = self.call(
            "hand_over",
            captures=captures,
            runs=rows,
            current=self._run_row(current["nodeid"], current["client"], current["started"])
            if current is not None and new
            else None,
        )
        if current is not None and new:
            current["row"] = row

    def _children_started(self) -> None:
        """A subprocess is starting: its traffic goes through the recorder, which from now
        until the test ends records it under the running test's label, as the test's own
        captures are (asked and answered before the subprocess starts). A test that starts
        none costs the recorder nothing."""
        self.children = True
        self.ensure_ready()
        current = self.current
        if current is not None and not current.get("relabelled"):
            current["relabelled"] = True
            try:
                self.call("relabel", label=self.label, to=current["client"])
            except ToolError as exc:
                raise _usage(exc) from None

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_call(self, item: pytest.Item) -> Generator[None, None, None]:
        """Note a test that runs with the proxy variables removed or changed (a fixture that
        clears them, as HTTP libraries' suites often do): its traffic went around the recorder."""
        if not self.recording or not self.given_env:
            return (yield)
        before = self._unproxied()
        try:
            return (yield)
        finally:
            gone = sorted(set(before) | set(self._unproxied()))
            if gone:
                item.stash[UNPROXIED] = gone

    def _unproxied(self) -> list[str]:
        return [name for name, value in self.given_env.items() if os.environ.get(name) != value]

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        gone = getattr(report, "redirect_audit_unproxied", None)
        if gone:
            self.unproxied[report.nodeid] = list(gone)
        gated = getattr(report, "redirect_audit_gate", None)
        if gated:
            self.gated[report.nodeid] = gated
        if report.failed:
            self.outcomes[report.nodeid] = "failed"
        elif report.skipped and self.outcomes.get(report.nodeid) != "failed":
            self.outcomes[report.nodeid] = "skipped"

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(
        self, item: pytest.Item, call: pytest.CallInfo[None]
    ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
        report = yield
        if call.when == "call" and UNPROXIED in item.stash:
            report.redirect_audit_unproxied = item.stash[UNPROXIED]  # type: ignore[attr-defined]  # sent to xdist's controller with the report
        if call.when != "call" or not self.recording or self.current is None:
            return report
        expect, ignore = _marked(item)
        self._settle()
        if self.fail_on is None and not expect:
            return report
        self.write_pending()
        try:
            text = self.call(
                "gate",
                test=self.current["nodeid"],
                client=self.current["client"],
                fail_on=self.fail_on,
                expect=expect,
                ignore=ignore,
            )
        except ToolError as exc:  # a marker naming no rule: the test's own mistake, said on it
            text = f"redirect-audit: {exc}"
        if text:
            # sent to xdist's controller with the report, which tells the two apart
            if report.passed:
                report.outcome = "failed"
                report.longrepr = text
                report.redirect_audit_gate = GATE_ALONE  # type: ignore[attr-defined]  # a report attribute of ours
            else:
                report.sections.append(("redirect-audit", text))
                report.redirect_audit_gate = GATE_TOO  # type: ignore[attr-defined]  # a report attribute of ours
        return report

    def pytest_report_teststatus(
        self, report: pytest.TestReport, config: pytest.Config
    ) -> tuple[str, str, tuple[str, dict[str, bool]]] | None:
        """A test that only the gate failed: still a failure (pytest's counts and exit status),
        shown as `G` (the gate) in the progress and `FAILED (redirect-audit)` with -v (`R` is
        pytest-rerunfailures's)."""
        if report.when == "call" and getattr(report, "redirect_audit_gate", None) == GATE_ALONE:
            return "failed", "G", ("FAILED (redirect-audit)", {"red": True})
        return None

    # ---- the summary -----------------------------------------------------------------------

    def pytest_terminal_summary(
        self, terminalreporter: pytest.TerminalReporter, exitstatus: int, config: pytest.Config
    ) -> None:
        if hasattr(config, "workerinput"):
            return  # the controller sums up for every worker
        if not (self.quiet or self.refused):  # `run` sums up for a quiet session
            self._summary_section(terminalreporter, config)
        if self.gated:
            self._gate_section(terminalreporter)

    def _summary_section(self, tr: pytest.TerminalReporter, config: pytest.Config) -> None:
        tr.section("redirect-audit")
        try:
            lines = self.call(
                "summary",
                labels=[self.label],
                recorder_lost=self.recorder_lost,
                tls_refused=self.tls_refused,
                tls_upstream_failed=self.tls_upstream_failed,
                unproxied=sorted(self.unproxied),
                allow_empty=self.allow_empty,
            )
        except ToolError as exc:
            tr.write_line(f"redirect-audit: could not read the findings: {exc}")
            return
        if config.getoption("verbose") > 0:
            tr.write_line(
                f"Configuration: {self.config_file}"
                if self.config_file
                else f"Configuration: no redirect-audit.toml or [tool.redirect-audit] from {config.rootpath} up"
            )
        for line in lines:
            tr.write_line(line)

    def _gate_section(self, tr: pytest.TerminalReporter) -> None:
        """The tests the gate failed, under their own heading: those whose own outcome was a
        pass apart from the ones that failed on their own as well."""
        alone = sorted(t for t, how in self.gated.items() if how == GATE_ALONE)
        too = sorted(t for t, how in self.gated.items() if how == GATE_TOO)
        tr.section("redirect-audit: tests failed by the gate", sep="-", red=True, bold=True)
        if alone:
            tr.write_line(
                f"{_tests(alone)} passed on {_their(alone)} own and failed only by the gate "
                "(new findings under --redirect-audit-fail-on, or a marker's expected rule that did not fire):"
            )
            for test in alone:
                tr.write_line(f"  {test}")
        if too:
            tr.write_line(
                f"{_tests(too)} failed on {_their(too)} own, and the gate failed {_them(too)} as well:"
            )
            for test in too:
                tr.write_line(f"  {test}")

    # ---- the fixture's questions -------------------------------------------------------------

    def ask(self, name: str, **args: Any) -> Any:
        """A question about the running test, once everything it sent is stored."""
        self.write_pending()
        current = self.current or {}
        try:
            return self.call(
                name, test=current.get("nodeid"), client=current.get("client", self.label), **args
            )
        except ToolError as exc:
            pytest.fail(f"redirect-audit: {exc}", pytrace=False)


class RedirectAudit:
    """The `redirect_audit` fixture: the current test's findings and chains."""

    def __init__(self, audit: AuditSession):
        self._audit = audit

    def __repr__(self) -> str:
        # what a failed test's traceback shows for the fixture argument
        return f"<redirect_audit: this test's findings and chains in {self._audit.db}>"

    @property
    def db(self) -> str:
        return self._audit.db

    @property
    def label(self) -> str:
        """The client label this process's traffic is recorded under."""
        return self._audit.label

    def flush(self) -> dict[str, Any]:
        """Wait until the recorder has stored everything the test has sent so far."""
        self._audit.write_pending()
        return dict(self._audit.call("flush"))

    def findings(self, min_severity: str = "info") -> list[dict[str, Any]]:
        """Findings (the JSON records of `redirect-audit findings -f json`) about this test's traffic."""
        return list(self._audit.ask("test_findings", min_severity=min_severity))

    def chains(self) -> list[dict[str, Any]]:
        """Chains this test's traffic made, hop by hop (as `redirect-audit chains -f json`)."""
        started = self._audit.current["started"] if self._audit.current else time.time()
        self._audit.write_pending()
        client = self._audit.current["client"] if self._audit.current else self._audit.label
        return list(self._audit.call("test_chains", client=client, started=started))

    def assert_no_findings(self, min_severity: str = "low") -> None:
        """Fail the test with its findings at or above `min_severity`, each hop in one line."""
        __tracebackhide__ = True  # the finding is the failure, not this line
        text = self._audit.ask("findings_text", min_severity=min_severity)
        if text:
            raise AssertionError(text)


@pytest.fixture
def redirect_audit(request: pytest.FixtureRequest) -> RedirectAudit:
    """The current test's redirect findings and chains (needs `pytest --redirect-audit`)."""
    audit = request.config.stash.get(STATE, None)
    if audit is None or not audit.recording:
        pytest.fail(
            "the redirect_audit fixture needs the recorder: run pytest with --redirect-audit "
            "(or redirect_audit = true in the ini file)",
            pytrace=False,
        )
    return RedirectAudit(audit)


def _tests(names: list[str]) -> str:
    return f"{len(names)} test" if len(names) == 1 else f"{len(names)} tests"


def _their(names: list[str]) -> str:
    return "its" if len(names) == 1 else "their"


def _them(names: list[str]) -> str:
    return "it" if len(names) == 1 else "them"
