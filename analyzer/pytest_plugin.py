"""redirect-audit for pytest: every redirect a test's traffic met, judged, and put on the test.

Off unless asked for: `pytest --redirect-audit[=DB]`, or `redirect_audit = true` in the
ini file (`redirect_audit_db = URL` names the store there). Then:

* one recorder (mitmdump with the recorder addon, on a free loopback port) per session,
  or per pytest-xdist worker, started before the first test. The test process's own
  clients are recorded in process (analyzer/inprocess.py: http.client, httpx, aiohttp;
  no proxy in their path) and handed to it in batches; the subprocesses tests start get
  its environment, as `redirect-audit run` gives it, and go through it
  (`--redirect-audit-mode=proxy`: the test process too). Each worker's traffic carries
  its own client label (`pytest-gw0-…`), so two workers are never linked into one chain;
* each test's start, end and outcome are stored (`test_runs`), and every hop and
  finding is attributed to the test during which it happened;
* a terminal summary: findings grouped by test, the hop in one line each, and the
  command that shows the chain;
* `--redirect-audit-fail-on=SEVERITY`: a test during which a new finding at or above it
  happened (not in `--redirect-audit-baseline FILE`) fails, with the finding in its report;
* the `redirect_audit` fixture: `findings()`, `chains()` and `assert_no_findings()`
  about the current test alone, after a flush of the recorder (its `/flush` control
  request), so that what the test sent is stored before it is judged.

Without a DB the exchanges go to a fresh store in a new temporary directory, printed
in the summary; a session that recorded nothing exits 2 (`--redirect-audit-allow-empty`).
Under `redirect-audit run -- pytest` the plugin is on without being asked, quietly (labels
and attribution; `run` sums up), and uses the recorder `run` started and `run`'s store.

This module is loaded by every pytest run in an environment where redirect-audit is
installed (the `pytest11` entry point): it imports nothing heavy until it is enabled.
"""

from __future__ import annotations

import os
import shlex
import shutil
import tempfile
import time
import uuid
from collections.abc import Generator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:  # annotations only: nothing heavy is imported until the plugin is enabled
    from analyzer.model import Severity
    from analyzer.recorded import ClientSeen
    from analyzer.report import Record
    from analyzer.session import Recording
    from analyzer.store import Store

SEVERITIES = ("info", "low", "medium", "high")
WORKER_MAIN = "main"
PENDING_MAX = 500  # finished tests (or captures) held before they are handed over at once
STATE = pytest.StashKey["AuditSession"]()
UNPROXIED = pytest.StashKey[list[str]]()  # the proxy variables a test ran without
DB_SUFFIXES = (".db", ".sqlite", ".sqlite3")


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
        "http.client, urllib, urllib3, requests and httpx, with no proxy in their path) or "
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
        "--redirect-audit-baseline",
        dest="redirect_audit_baseline",
        default=None,
        metavar="FILE",
        help="Findings recorded in this baseline (redirect-audit check --write-baseline) are known: "
        "they fail no test",
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
    return bool(os.environ.get("REDIRECT_AUDIT_PROXY") and os.environ.get("REDIRECT_AUDIT_DB"))


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


@pytest.hookimpl(trylast=True)
def pytest_configure(config: pytest.Config) -> None:
    if not _enabled(config):
        return
    from analyzer.model import Severity

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
        if db is None and os.environ.get("REDIRECT_AUDIT_PROXY") and os.environ.get("REDIRECT_AUDIT_DB"):
            db = os.environ["REDIRECT_AUDIT_DB"]  # under `redirect-audit run`: its store and its recorder
        if db is None:
            db = str(Path(tempfile.mkdtemp(prefix="redirect-audit-pytest-")) / "capture.db")
            fresh = True
    fail_on = config.getoption("redirect_audit_fail_on")
    baseline = config.getoption("redirect_audit_baseline")
    quiet = not _asked(config) and not (workerinput or {}).get("redirect_audit_asked", False)
    audit = AuditSession(
        config,
        db=db,
        session=session,
        fresh=fresh,
        fail_on=Severity.parse(fail_on) if fail_on else None,
        baseline=baseline,
        quiet=quiet,
    )
    config.stash[STATE] = audit
    config.pluginmanager.register(audit, "redirect-audit-session")


class AuditSession:
    """The plugin's state for one pytest process (the controller, or one xdist worker)."""

    def __init__(
        self,
        config: pytest.Config,
        *,
        db: str,
        session: str,
        fresh: bool,
        fail_on: Severity | None,
        baseline: str | None,
        quiet: bool = False,
    ):
        self.config = config
        # Under `run` without --redirect-audit: labels and attribution only; `run` sums up
        # (this session's findings, its exit status), with the tests that ran unproxied.
        self.quiet = quiet
        self.db = db
        self.session = session
        self.fresh = fresh
        self.fail_on = fail_on
        self.worker = _worker(config)
        self.controller = _xdist_controller(config)  # workers record; the controller only sums up
        self.label = f"pytest-{self.worker}-{session}"
        self.recording: Recording | None = None
        self.saved_env: dict[str, str | None] = {}
        self.current: dict[str, Any] | None = None  # the running test: nodeid, row id, start
        self.outcomes: dict[str, str] = {}
        self.known: set[str] = set()
        self._opened: Store | None = None  # once used
        self._last_seen: int | None = None  # the recorder's count at the last analysis
        self.tests = 0  # tests started in this process
        self.allow_empty = bool(config.getoption("redirect_audit_allow_empty"))
        self.given_env: dict[str, str] = {}  # the proxy variables as the recorder set them
        self.unproxied: dict[str, list[str]] = {}  # test -> proxy variables it ran without
        self.tls_refused: dict[str, int] = {}  # host -> handshakes refused (every worker's)
        self.tls_upstream_failed: dict[str, int] = {}
        self.seen: list[ClientSeen] | None = None  # what the session recorded, once it ended
        self.recorder_lost = False  # the recorder stopped answering before the session ended
        self.in_process = config.getoption("redirect_audit_mode") == "in-process"
        self.sink: Any = None  # inprocess.Sink, once recording in process
        self.pending_runs: list[dict[str, Any]] = []  # finished tests' rows not stored yet (in process)
        self.children = False  # a subprocess was started (in process: the recorder then labels per test)
        self.starting = False  # the recorder was launched and has not been waited for yet
        self._changes: dict[str, str | None] | None = None  # a subprocess's environment, on top
        self.baseline = baseline
        if baseline is not None:
            from analyzer.exports import BaselineError, read_baseline

            try:
                self.known = read_baseline(Path(baseline))
            except BaselineError as exc:
                raise pytest.UsageError(f"--redirect-audit-baseline: {exc}") from None
        from analyzer.storeread import resolve_db_url

        self.url = resolve_db_url(db)

    # ---- xdist -----------------------------------------------------------------------------

    @pytest.hookimpl(optionalhook=True)
    def pytest_configure_node(self, node: Any) -> None:  # xdist's WorkerController
        node.workerinput["redirect_audit_db"] = self.db
        node.workerinput["redirect_audit_session"] = self.session
        node.workerinput["redirect_audit_fresh"] = self.fresh
        node.workerinput["redirect_audit_asked"] = not self.quiet

    # ---- the recorder ------------------------------------------------------------------------

    def pytest_sessionstart(self, session: pytest.Session) -> None:
        from analyzer.store import open_store
        from analyzer.storeread import StoreError

        try:
            open_store(self.db).close()  # made (or checked) once, before workers and recorders use it
        except StoreError as exc:
            raise pytest.UsageError(f"--redirect-audit: {exc}") from None
        if self.controller:
            return
        from analyzer.session import PROXY_ENV, Recording, SessionError, attach

        workdir = Path(tempfile.mkdtemp(prefix=f"redirect-audit-{self.worker}-"))
        confdir = Path(os.environ.get("REDIRECT_AUDIT_CONFDIR", "~/.mitmproxy")).expanduser()
        outer = os.environ.get(PROXY_ENV)
        try:
            if outer and self.url == os.environ.get("REDIRECT_AUDIT_DB"):
                recording = attach(outer, self.url, workdir, self.label, confdir)
            else:
                recording = Recording(
                    db_url=self.url, workdir=workdir, label=self.label, proxy_id=self.label, confdir=confdir
                )
                if self.in_process:  # its clients are recorded here: the first tests run while it boots
                    recording.launch()
                    self.starting = True
                else:
                    recording.start()
        except SessionError as exc:
            shutil.rmtree(workdir, ignore_errors=True)
            raise pytest.UsageError(f"--redirect-audit: {exc}") from None
        self.recording = recording
        from analyzer.session import PROXY_VARS

        if self.in_process:
            self._record_in_process(under_run=bool(outer))
            return
        env, _ = recording.environ()
        self.given_env = {name: env[name] for name in PROXY_VARS if name in env}
        for name in set(env) | set(os.environ):
            if env.get(name) != os.environ.get(name):
                self.saved_env[name] = os.environ.get(name)
                if name in env:
                    os.environ[name] = env[name]
                else:
                    del os.environ[name]

    def _record_in_process(self, under_run: bool) -> None:
        """This process's clients are recorded where they run; the subprocesses tests start
        get the recorder proxy's environment. This process keeps its own environment, less
        the proxy variables `run` put in it (its clients would otherwise go to the proxy)."""
        from analyzer import inprocess
        from analyzer.session import PROXY_VARS

        if under_run:
            for name in PROXY_VARS:
                if name in os.environ:
                    self.saved_env[name] = os.environ.pop(name)
        self.sink = inprocess.Sink(self.label)
        inprocess.install(self.sink)
        inprocess.give_children(self._child_env, on_start=self._children_started)

    def _child_env(self) -> dict[str, str | None]:
        """What a subprocess's environment needs on top of this process's: the recorder's
        (computed once it is up: the CA bundle and the label's port come from it)."""
        if self._changes is None:
            self.ensure_ready()
            assert self.recording is not None
            env, _ = self.recording.environ()
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
        """Wait for the recorder launched at session start, the first time it is needed."""
        if self.starting and self.recording is not None:
            from analyzer.session import SessionError

            self.starting = False
            try:
                self.recording.ready()
            except SessionError as exc:
                raise pytest.UsageError(f"--redirect-audit: {exc}") from None

    def send_captures(self) -> None:
        """Hand the recorder what this process's clients sent since the last call."""
        if self.sink is None or self.recording is None:
            return
        self.ensure_ready()
        captures = self.sink.take()
        if captures:
            self.recording.record([c.as_json() for c in captures])

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
        self.ensure_ready()  # a recorder still booting is waited for: it is flushed and stopped below
        if self.sink is not None:
            from analyzer import inprocess

            try:
                self.write_pending()
            finally:
                inprocess.uninstall()
        if self.recording is not None:
            from http.client import HTTPException

            from analyzer.session import SessionError

            try:
                self._add_tls(self.recording.flush())
            except (OSError, HTTPException, SessionError):
                self.recorder_lost = True  # it stopped answering: what it held may be missing
            if not self.recording.attached:
                # it has stored everything (the flush): it winds down while the summary is read,
                # and pytest_unconfigure waits for it
                self.recording.stop(wait=False)
        workeroutput = getattr(self.config, "workeroutput", None)
        if workeroutput is not None:  # an xdist worker: the controller sums up
            workeroutput["redirect_audit_tls"] = [self.tls_refused, self.tls_upstream_failed]
            return
        if self.quiet:
            self._tell_run()
            return
        from analyzer.recorded import clients_seen

        clients, recorders = self.session_clients()
        with self._store() as store:
            self.seen = clients_seen(store, clients=clients, prefixes=[f"proxy:{r}/" for r in recorders])
        if not self.seen and not self.allow_empty and session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.INTERRUPTED  # 2, as `redirect-audit run` exits

    def _tell_run(self) -> None:
        """Leave `run` a line about this session (as the Node preload does about each process):
        the tests that ran with the proxy variables removed go into its summary."""
        from analyzer.files import write_private
        from analyzer.session import RUNTIMES_ENV

        where = os.environ.get(RUNTIMES_ENV)
        if not where or not Path(where).is_dir():
            return
        import json
        import platform

        line = {
            "runtime": f"pytest {pytest.__version__} (Python {platform.python_version()})",
            "pid": os.getpid(),
            "script": "pytest",
            "tests": self.tests or len(self.outcomes),
            "unproxied": sorted(self.unproxied),
        }
        write_private(str(Path(where) / f"pytest-{os.getpid()}.json"), json.dumps(line) + "\n")

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
        if self._opened is not None:
            self._opened.close()
            self._opened = None
        if self.recording is not None:
            self.recording.stop()
            # its CA bundle, truststore and log: a directory of this session's, left behind by nothing
            shutil.rmtree(self.recording.workdir, ignore_errors=True)
            self.recording = None

    # ---- each test -------------------------------------------------------------------------

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_protocol(
        self, item: pytest.Item, nextitem: pytest.Item | None
    ) -> Generator[None, object, object]:
        recording = self.recording
        if recording is None:
            return (yield)
        from sqlalchemy import insert, update

        from analyzer.store import test_runs

        self.tests += 1
        client = f"{self.label}-t{self.tests}"  # this test's own client: chains never cross tests
        if self.sink is not None:
            return (yield from self._in_process_test(item, client))
        recording.relabel(self.label, client)
        started = time.time()
        with self._store() as store, store.begin() as conn:
            key = conn.execute(
                insert(test_runs).values(
                    session=self.session,
                    nodeid=item.nodeid,
                    worker=self.worker,
                    client=client,
                    recorder=self.label,
                    started_at=started,
                )
            ).inserted_primary_key
        assert key is not None  # an INSERT always returns the new row's key
        row = key[0]
        self.current = {"nodeid": item.nodeid, "row": row, "started": started, "client": client}
        try:
            return (yield)
        finally:
            self.current = None
            recording.relabel(self.label, None)  # between tests: the worker's own label
            with self._store() as store, store.begin() as conn:
                conn.execute(
                    update(test_runs)
                    .where(test_runs.c.id == row)
                    .values(ended_at=time.time(), outcome=self.outcomes.get(item.nodeid, "passed"))
                )

    def _in_process_test(self, item: pytest.Item, client: str) -> Generator[None, object, object]:
        """A test whose clients are recorded in process: its captures carry its label, so the
        recorder is asked for nothing per test (its traffic and its `test_runs` row are handed
        over in batches, and before anything reads the store) unless a subprocess the tests
        started sends through it, which then needs the test's label there too."""
        assert self.recording is not None and self.sink is not None
        self.sink.label = client
        if self.children:
            self.recording.relabel(self.label, client)
        started = time.time()
        self.current = {"nodeid": item.nodeid, "row": None, "started": started, "client": client}
        current = self.current
        try:
            return (yield)
        finally:
            self.current = None
            self.sink.label = self.label
            if self.children:
                self.recording.relabel(self.label, None)
            ended = {"ended_at": time.time(), "outcome": self.outcomes.get(item.nodeid, "passed")}
            if current["row"] is not None:  # written already, for a read during the test
                self._end_row(current["row"], ended)
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

    def _end_row(self, row: int, values: dict[str, Any]) -> None:
        from sqlalchemy import update

        from analyzer.store import test_runs

        with self._store() as store, store.begin() as conn:
            conn.execute(update(test_runs).where(test_runs.c.id == row).values(**values))

    def write_pending(self) -> None:
        """Hand over the captures and store the finished tests' rows waiting here; the running
        test's row too, so that what reads the store now finds it."""
        from sqlalchemy import insert

        from analyzer.store import test_runs

        self.send_captures()
        rows, self.pending_runs = self.pending_runs, []
        current = self.current
        with self._store() as store, store.begin() as conn:
            if rows:
                conn.execute(insert(test_runs), rows)
            if current is not None and current["row"] is None:
                key = conn.execute(
                    insert(test_runs).values(
                        **self._run_row(current["nodeid"], current["client"], current["started"])
                    )
                ).inserted_primary_key
                assert key is not None  # an INSERT always returns the new row's key
                current["row"] = key[0]

    def _children_started(self) -> None:
        """A subprocess is starting: its traffic goes through the recorder, so from now on the
        recorder labels it with the running test's label, as the test's own captures are."""
        if not self.children:
            self.children = True
            self.ensure_ready()
            if self.recording is not None and self.current is not None:
                self.recording.relabel(self.label, self.current["client"])

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_call(self, item: pytest.Item) -> Generator[None, None, None]:
        """Note a test that runs with the proxy variables removed or changed (a fixture that
        clears them, as HTTP libraries' suites often do): its traffic went around the recorder."""
        if self.recording is None or not self.given_env:
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
        if call.when != "call" or self.fail_on is None or self.recording is None or self.current is None:
            return report
        from analyzer.exports import gate
        from analyzer.report import hop_text

        failing = gate(self.test_findings(), self.fail_on, self.known)
        if failing:
            lines = [
                f"redirect-audit: {len(failing)} new finding(s) at or above {self.fail_on} during this test:"
            ]
            for f in failing:
                lines += [
                    f"  {f['severity'].upper()} {f['rule_id']} {f['rule']}: {hop_text(f)}",
                    f"    {f['message']}",
                    f"    chain {f['chain_id']}: {self.command(f['chain_id'])}"
                    if f["chain_id"] is not None
                    else "",
                ]
            text = "\n".join(line for line in lines if line)
            if report.passed:
                report.outcome = "failed"
                report.longrepr = text
            else:
                report.sections.append(("redirect-audit", text))
        return report

    # ---- reading the store -----------------------------------------------------------------

    def _store(self) -> _Kept:
        """The store, opened once per process (an engine per test would cost ~10 ms each)."""
        if self._opened is None:
            from analyzer.store import open_store

            self._opened = open_store(self.db, create=False)
        return _Kept(self._opened)

    def analyzed(self) -> bool:
        """Everything the recorder has seen is stored and analyzed; False when it has seen
        nothing since the last call (the analysis would not change)."""
        seen = None
        recording = self.recording
        self.ensure_ready()
        if recording is not None and (recording.attached or recording.running):
            if self.sink is not None:
                self.write_pending()
            seen = recording.flush().get("seen")
        if seen is not None and seen == self._last_seen:
            return False
        from analyzer.analysis import analyze

        with self._store() as store:
            analyze(store)
        self._last_seen = seen
        return True

    def mine(self, client: str | None) -> bool:
        """Traffic of the running test: its label, or this recorder's clients known by address."""
        label = self.current["client"] if self.current else self.label
        return client is not None and (client == label or client.startswith(f"proxy:{self.label}/"))

    def test_findings(self, min_severity: str = "info") -> list[Record]:
        """The findings of the running test, after a flush and an analysis (skipped, and the
        last answer reused, when the recorder has seen nothing since)."""
        from analyzer.model import Severity
        from analyzer.report import finding_records
        from analyzer.storeread import open_reader

        current = self.current or {}
        fresh = self.analyzed()
        found = current.get("found")
        if fresh or found is None:
            with open_reader(self.db) as reader:
                records = finding_records(reader, clients=(current.get("client", self.label), self.label))
            found = [r for r in records if r["test"] == current.get("nodeid") and self.mine(r["client"])]
            if self.current is not None:
                self.current["found"] = found
        floor = Severity.parse(min_severity)
        return [r for r in found if Severity.parse(r["severity"]) >= floor]

    def test_chains(self) -> list[Record]:
        from analyzer.report import chain_records
        from analyzer.storeread import open_reader

        started = self.current["started"] if self.current else time.time()
        self.analyzed()
        with open_reader(self.db) as reader:
            chains = chain_records(reader)
        return [
            c
            for c in chains
            if self.mine(c["client"])
            and c["hops"][0]["from"]["started_at"] is not None
            and _epoch(c["hops"][0]["from"]["started_at"]) >= started - 1e-3
        ]

    def command(self, chain_id: int) -> str:
        prefix = "uv run redirect-audit" if os.environ.get("UV_RUN_RECURSION_DEPTH") else "redirect-audit"
        return f"{prefix} chains --db {shlex.quote(self.shown)} --chain {chain_id}"

    @property
    def shown(self) -> str:
        """The store as messages name it: its path, or its URL without a password."""
        from analyzer.storeread import shown

        return shown(self.db)

    # ---- the summary -----------------------------------------------------------------------

    def pytest_terminal_summary(
        self, terminalreporter: pytest.TerminalReporter, exitstatus: int, config: pytest.Config
    ) -> None:
        if hasattr(config, "workerinput") or self.quiet:
            return  # the controller sums up for every worker; `run` for a quiet session
        from analyzer.report import hop_text

        tr = terminalreporter
        tr.section("redirect-audit")
        try:
            records = self.session_findings()
        except Exception as exc:
            tr.write_line(f"redirect-audit: could not read the findings: {exc}")
            return
        where = f"a fresh store, {self.shown}" if self.fresh else self.shown
        if not self._what_was_seen(tr, where):
            return
        if not records:
            tr.write_line(f"No findings in this session's traffic (store: {where}).")
            return
        by_test: dict[str, list[Record]] = {}
        for r in records:
            by_test.setdefault(r["test"] or "(outside any test)", []).append(r)
        for test, found in by_test.items():
            tr.write_line(f"{test}: {len(found)} finding(s)")
            for f in found:
                tr.write_line(f"  {f['severity'].upper():<6} {f['rule_id']} {f['rule']}: {hop_text(f)}")
                if f["chain_id"] is not None:
                    tr.write_line(f"         {self.command(f['chain_id'])}")
        tests = sum(1 for t in by_test if t != "(outside any test)")
        tr.write_line(f"{len(records)} finding(s) in {tests} test(s); store: {where}")

    def _what_was_seen(self, tr: pytest.TerminalReporter, where: str) -> bool:
        """Say what the session recorded and could not see; False when it recorded nothing."""
        from analyzer import recorded

        seen = self.seen or []
        tr.write_line(recorded.recorded_line(seen))
        if self.recorder_lost:
            tr.write_line(
                "The recorder stopped answering before the session ended: its last exchanges may be missing."
            )
        for line in recorded.tls_lines(self.tls_refused, self.tls_upstream_failed):
            tr.write_line(line)
        if self.unproxied:
            tr.write_line(recorded.unproxied_line(sorted(self.unproxied)))
        if seen:
            return True
        tr.write_line(f"Nothing was judged (store: {where}), so this is not an all-clear. It may be that:")
        for reason in recorded.empty_reasons(
            refused=self.tls_refused, unproxied=len(self.unproxied), pytest=True
        ):
            tr.write_line(f"  - {reason}")
        verdict = "passes" if self.allow_empty else "exits 2"
        tr.write_line(
            f"The session {verdict}; --redirect-audit-allow-empty accepts a session that records nothing."
        )
        return False

    def session_findings(self) -> list[Record]:
        from analyzer.analysis import analyze
        from analyzer.report import finding_records
        from analyzer.storeread import open_reader

        with self._store() as store:
            analyze(store)
        clients, recorders = self.session_clients()
        with open_reader(self.db) as reader:
            records = finding_records(reader)
        prefixes = tuple(f"proxy:{r}/" for r in recorders)
        return [r for r in records if r["client"] in clients or (r["client"] or "").startswith(prefixes)]

    def session_clients(self) -> tuple[set[str], set[str]]:
        """(the labels this session's traffic was recorded under, the names of its recorders)."""
        from sqlalchemy import select

        from analyzer.store import test_runs

        with self._store() as store, store.begin() as conn:
            rows = conn.execute(
                select(test_runs.c.client, test_runs.c.recorder)
                .distinct()
                .where(test_runs.c.session == self.session)
            ).all()
        recorders = {r for _, r in rows} | {self.label}
        return {c for c, _ in rows} | recorders, recorders


class _Kept:
    """`with` on the store the session keeps open: nothing to close after each use."""

    def __init__(self, store: Store):
        self.store = store

    def __enter__(self) -> Store:
        return self.store

    def __exit__(self, *exc: object) -> None:
        return None


def _epoch(iso_text: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso_text.replace("Z", "+00:00")).timestamp()


class RedirectAudit:
    """The `redirect_audit` fixture: the current test's findings and chains."""

    def __init__(self, audit: AuditSession):
        self._audit = audit

    @property
    def db(self) -> str:
        return self._audit.db

    @property
    def label(self) -> str:
        """The client label this process's traffic is recorded under."""
        return self._audit.label

    def flush(self) -> dict[str, Any]:
        """Wait until the recorder has stored everything the test has sent so far."""
        recording = self._audit.recording
        assert recording is not None  # the fixture is only handed out with a recorder
        if self._audit.sink is not None:
            self._audit.write_pending()
        return recording.flush()

    def findings(self, min_severity: str = "info") -> list[Record]:
        """Findings (the JSON records of `redirect-audit findings -f json`) about this test's traffic."""
        return self._audit.test_findings(min_severity)

    def chains(self) -> list[Record]:
        """Chains this test's traffic made, hop by hop (as `redirect-audit chains -f json`)."""
        return self._audit.test_chains()

    def assert_no_findings(self, min_severity: str = "low") -> None:
        from analyzer.report import hop_text

        found = self.findings(min_severity)
        if found:
            lines = [f"redirect-audit: {len(found)} finding(s) at or above {min_severity} during this test:"]
            lines += [
                f"  {f['severity'].upper()} {f['rule_id']} {f['rule']}: {hop_text(f)}\n    {f['message']}"
                for f in found
            ]
            raise AssertionError("\n".join(lines))


@pytest.fixture
def redirect_audit(request: pytest.FixtureRequest) -> RedirectAudit:
    """The current test's redirect findings and chains (needs `pytest --redirect-audit`)."""
    audit = request.config.stash.get(STATE, None)
    if audit is None or audit.recording is None:
        pytest.fail(
            "the redirect_audit fixture needs the recorder: run pytest with --redirect-audit "
            "(or redirect_audit = true in the ini file)",
            pytrace=False,
        )
    return RedirectAudit(audit)
