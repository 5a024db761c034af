"""The tool's half of the pytest plugin: the recorder, the store and the analysis for one
pytest process, behind calls whose arguments and answers are plain JSON.

The plugin (`pytest-redirect-audit`, plugin/) goes into the environment under test and
needs only pytest and the standard library there. Everything that needs mitmproxy,
SQLAlchemy or the rules happens here, in redirect-audit's own process and environment:
`redirect-audit pytest-backend` (or `python -m analyzer pytest-backend` where it is
installed with the tests), a child of the test process, which reads one JSON call per
line on its stdin and writes one JSON answer per line (`serve`). The test process never
imports any of it (a suite with `filterwarnings = error` would fail on mitmproxy's
import-time deprecation warnings).

A call is `{"call": NAME, "args": {...}}`; the answer `{"ok": VALUE}`, or
`{"error": MESSAGE, "kind": "usage" | "lost" | "internal"}`: a usage error is the user's
to fix (a store that cannot be opened, a baseline that does not parse), a lost one means
the recorder stopped answering. `PROTOCOL` changes whenever a call does; the plugin
refuses a tool that speaks another.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from analyzer import __version__

if TYPE_CHECKING:
    from analyzer.model import Severity
    from analyzer.report import Record
    from analyzer.selection import Selection
    from analyzer.session import Recording
    from analyzer.store import Store

PROTOCOL = (
    3  # 2: configure takes the configuration, gate the marker's expect and ignore; 3: start keep_bodies
)
Json = Any


class BackendError(Exception):
    def __init__(self, message: str, kind: str = "usage") -> None:
        super().__init__(message)
        self.kind = kind


class Backend:
    """One pytest process's recorder, store and analysis (the controller's: the store and the
    summary only)."""

    def __init__(self) -> None:
        self.db = ""
        self.session = ""
        self.label = ""
        self.fresh = False
        self.known: set[str] = set()
        self.selection: Selection | None = None  # the project's configuration, the plugin's options over it
        self.thresholds: dict[str, float] = {}
        self.hosts: tuple[str, ...] = ()  # only findings on these hosts (globs)
        self.recording: Recording | None = None
        self.starting = False
        self.in_process = True
        self.keep_bodies = False  # request bodies kept (redacted), as the session asked
        # the recorder was waited for (proxy mode, a subprocess's environment, `run`'s): only
        # then can anything have been sent through it; launched and never waited for, it is
        # stopped where it stands
        self._readied = False
        self._direct: _Direct | None = None  # the test process's own captures, stored here
        self._opened: Store | None = None
        self._last_seen: int | None = None
        self._found: dict[tuple[str, str], list[Record]] = {}  # (test, client) -> its findings, last read
        self._suppressed: list[Record] = []  # the session's findings the configuration suppressed

    # ---- set-up ----------------------------------------------------------------------------

    def hello(self) -> Json:
        return {"protocol": PROTOCOL, "version": __version__, "python": sys.executable}

    def configure(
        self,
        db: str,
        session: str,
        fresh: bool,
        baseline: str | None,
        config_dir: str | None = None,
        config_file: str | None = None,
        select: list[str] | None = None,
        ignore: list[str] | None = None,
        min_confidence: float | None = None,
        hosts: list[str] | None = None,
    ) -> Json:
        """Name the store (checked, and made if missing), read the baseline and the project's
        configuration (found from `config_dir` up, pytest's rootdir; or `config_file`)."""
        from analyzer.config import ConfigError, UnknownRule, find_config, read_settings
        from analyzer.selection import Selection
        from analyzer.store import open_store
        from analyzer.storeread import StoreError, resolve_db_url, shown

        self.db, self.session, self.fresh = db, session, fresh
        try:
            found = (
                Path(config_file) if config_file else find_config(Path(config_dir) if config_dir else None)
            )
            if found is not None and config_file and not found.is_file():
                raise ConfigError(f"{config_file}: no such configuration file")
            settings = read_settings(found) if found is not None else None
            self.selection = Selection.build(
                settings, select=select or None, ignore=ignore or (), min_confidence=min_confidence
            )
        except ConfigError as exc:
            raise BackendError(f"--redirect-audit: {exc}") from None
        except UnknownRule as exc:
            raise BackendError(f"--redirect-audit: unknown rule {exc.name!r} ({exc.known})") from None
        self.thresholds = settings.thresholds if settings is not None else {}
        self.hosts = tuple(hosts or ())
        if baseline is not None:
            from analyzer.exports import BaselineError, read_baseline

            try:
                self.known = read_baseline(Path(baseline))
            except BaselineError as exc:
                raise BackendError(f"--redirect-audit-baseline: {exc}") from None
        try:
            open_store(db).close()  # made (or checked) once, before workers and recorders use it
        except StoreError as exc:
            raise BackendError(f"--redirect-audit: {exc}") from None
        return {
            "url": resolve_db_url(db),
            "shown": shown(db),
            "config": str(found) if found is not None else None,
            "fail_on": settings.fail_on if settings is not None else None,
        }

    def start(self, label: str, in_process: bool, confdir: str, keep_bodies: bool = False) -> Json:
        """Start this process's recorder (or attach to `redirect-audit run`'s, when the
        tests run under it and share its store). In process, not yet: the test process's
        own clients need no proxy, and `ready` starts it for the first subprocess (a
        session whose tests start none never runs one). `keep_bodies`: request bodies are
        kept (redacted) by this session's recorder and in-process captures; `run`'s
        recorder keeps them as `run` was told."""
        from analyzer.session import PROXY_ENV, Recording, SessionError, attach
        from analyzer.storeread import resolve_db_url

        self.label, self.in_process, self.keep_bodies = label, in_process, keep_bodies
        url = resolve_db_url(self.db)
        workdir = Path(tempfile.mkdtemp(prefix=f"redirect-audit-{label.split('-')[1]}-"))
        outer = os.environ.get(PROXY_ENV)
        try:
            if outer and url == os.environ.get("REDIRECT_AUDIT_DB"):
                # `run`'s, which may still be booting (its command starts at once): asked
                # for nothing until needed (a subprocess's label; the captures, at the end)
                recording = attach(outer, url, workdir, label, Path(confdir).expanduser(), check=False)
                self.starting = True
            else:
                recording = Recording(
                    db_url=url,
                    workdir=workdir,
                    label=label,
                    proxy_id=label,
                    confdir=Path(confdir).expanduser(),
                    keep_bodies=keep_bodies,
                )
                if in_process:  # started for the first subprocess a test starts, if one does
                    self.starting = True
                    _warm_up()
                else:
                    recording.start()
                    self._readied = True
        except SessionError as exc:
            shutil.rmtree(workdir, ignore_errors=True)
            raise BackendError(f"--redirect-audit: {exc}") from None
        self.recording = recording
        return {"attached": recording.attached}

    def ready(self) -> Json:
        """Start the recorder and wait for it (`run`'s: wait until it answers, and ask for
        the label's listener), the first time it is needed."""
        if self.starting and self.recording is not None:
            from http.client import HTTPException

            from analyzer.session import SessionError

            self.starting = False
            recording = self.recording
            try:
                if recording.attached:
                    recording.control("/ping", timeout=60.0)
                    recording.listen()
                else:
                    recording.start()
            except (SessionError, OSError, HTTPException) as exc:
                raise BackendError(f"--redirect-audit: the recorder: {exc}") from None
            self._readied = True
        return None

    def environ(self, base: dict[str, str]) -> Json:
        """The environment a process recorded through the proxy gets: `base` (the test
        process's) with the proxy variables, the CA bundle and the runtimes' settings."""
        self.ready()
        env, _ = self._recording().environ(base)
        return env

    def _recording(self) -> Recording:
        if self.recording is None:
            raise BackendError("the recorder was not started", kind="internal")
        return self.recording

    # ---- the recorder ------------------------------------------------------------------------

    def hand_over(
        self, captures: list[dict[str, Any]], runs: list[dict[str, Any]], current: dict[str, Any] | None
    ) -> Json:
        """Store what the test process holds: its clients' captures (through the recorder,
        as the proxy's flows are), the finished tests' rows, and the running test's row
        (its id is the answer), so that what reads the store now finds them."""
        from sqlalchemy import insert

        from analyzer.store import test_runs

        if captures:
            recording = self.recording
            if recording is not None and recording.attached:  # `run`'s: its capture, its summary
                self._lost(lambda: recording.record(captures))
            else:  # no proxy needed: stored here, through the flows the recorder would make
                if self._direct is None:
                    self._direct = _Direct(self._store().store, self.label, self.keep_bodies)
                self._direct.add(captures)
        row = None
        with self._store() as store, store.begin() as conn:
            if runs:
                conn.execute(insert(test_runs), runs)
            if current is not None:
                key = conn.execute(insert(test_runs).values(**current)).inserted_primary_key
                assert key is not None  # an INSERT always returns the new row's key
                row = key[0]
        return row

    def end_run(self, row: int, values: dict[str, Any]) -> Json:
        from sqlalchemy import update

        from analyzer.store import test_runs

        with self._store() as store, store.begin() as conn:
            conn.execute(update(test_runs).where(test_runs.c.id == row).values(**values))
        return None

    def relabel(self, label: str, to: str | None) -> Json:
        self.ready()
        return self._lost(lambda: self._recording().relabel(label, to))

    def flush(self) -> Json:
        """Wait until everything handed over or sent through the recorder is stored; the
        counts (`seen`: exchanges so far, both ways)."""
        answer: dict[str, Any] = {}
        recording = self.recording
        if recording is not None and (recording.attached or self._readied or not self.in_process):
            answer = dict(self._lost(lambda: self._recording().flush()))
        if self._direct is not None:
            self._direct.flush()
            answer["seen"] = int(answer.get("seen") or 0) + self._direct.recorder.seen
            answer["refused"] = self._direct.refused
        return answer

    def stop(self, wait: bool = True) -> Json:
        """Stop the recorder (it stores what it holds; one nothing could reach yet is ended
        where it stands); attached to `run`'s, nothing to stop. The test process's own
        captures are stored by now."""
        if self._direct is not None:
            self._direct.close()
        if self.recording is not None and not self.recording.attached and self.recording.process is not None:
            self.recording.stop(wait=wait)
        return None

    def close(self) -> Json:
        if self._direct is not None:
            self._direct.close()
        if self._opened is not None:
            self._opened.close()
            self._opened = None
        if self.recording is not None:
            self.recording.stop()
            # its CA bundle, truststore and log: a directory of this session's, left behind by nothing
            shutil.rmtree(self.recording.workdir, ignore_errors=True)
            self.recording = None
        return None

    def _lost(self, call: Any) -> Json:
        from http.client import HTTPException

        from analyzer.session import SessionError

        try:
            return call()
        except (OSError, HTTPException, SessionError) as exc:
            raise BackendError(f"the recorder stopped answering: {exc}", kind="lost") from None

    # ---- a test's findings and chains ------------------------------------------------------

    def _store(self) -> _Kept:
        """The store, opened once per process (an engine per test would cost ~10 ms each)."""
        if self._opened is None:
            from analyzer.store import open_store

            self._opened = open_store(self.db, create=False)
        return _Kept(self._opened)

    def _analyzed(self) -> bool:
        """Everything the recorder has seen is stored and analyzed; False when it has seen
        nothing since the last call (the analysis would not change)."""
        seen = self.flush().get("seen")
        if seen is not None and seen == self._last_seen:
            return False
        from analyzer.analysis import AnalysisOptions, analyze

        with self._store() as store:
            analyze(store, AnalysisOptions.from_dict(self.thresholds))
        self._last_seen = seen
        self._found = {}
        return True

    def _mine(self, client: str | None, label: str) -> bool:
        """Traffic of the running test: its label, or this recorder's clients known by address."""
        return client is not None and (client == label or client.startswith(f"proxy:{self.label}/"))

    def test_findings(self, test: str, client: str, min_severity: str = "info") -> Json:
        """The findings of a test (client: its label), after a flush and an analysis (skipped,
        and the last answer reused, when the recorder has seen nothing since)."""
        from analyzer.model import Severity
        from analyzer.report import finding_records
        from analyzer.storeread import open_reader

        self._analyzed()
        found = self._found.get((test, client))
        if found is None:
            with open_reader(self.db) as reader:
                records = finding_records(reader, clients=(client, self.label))
            found = [r for r in records if r["test"] == test and self._mine(r["client"], client)]
            self._found[(test, client)] = found
        floor = Severity.parse(min_severity)
        shown, _ = self._select(found)
        return [r for r in shown if Severity.parse(r["severity"]) >= floor]

    def _select(
        self, records: list[Record], ignore: list[str] | None = None
    ) -> tuple[list[Record], list[Record]]:
        """(shown, suppressed) under the project's configuration and a test's own ignores."""
        from dataclasses import replace

        from analyzer.config import resolve_rules
        from analyzer.selection import Selection, only

        selection = self.selection or Selection()
        if ignore:
            selection = replace(selection, test_ignores=tuple(resolve_rules(ignore)))
        shown, hidden = selection.apply(records)
        return only(shown, hosts=self.hosts), only(hidden, hosts=self.hosts)

    def test_chains(self, client: str, started: float) -> Json:
        from analyzer.report import chain_records
        from analyzer.storeread import open_reader

        self._analyzed()
        with open_reader(self.db) as reader:
            chains = chain_records(reader)
        return [
            c
            for c in chains
            if self._mine(c["client"], client)
            and c["hops"][0]["from"]["started_at"] is not None
            and _epoch(c["hops"][0]["from"]["started_at"]) >= started - 1e-3
        ]

    def gate(
        self,
        test: str,
        client: str,
        fail_on: str | None,
        expect: list[str] | None = None,
        ignore: list[str] | None = None,
    ) -> Json:
        """What fails a test, in words ("" when nothing does): under `--redirect-audit-fail-on`,
        its new findings at or above the severity that it did not expect or ignore
        (`@pytest.mark.redirect_audit(expect=[...], ignore=[...])`); and each rule it
        expected that did not fire during it."""
        from analyzer.config import UnknownRule, resolve_rules
        from analyzer.exports import gate

        try:
            expected = resolve_rules(expect or [])
            shown, _ = self._select(self._test_records(test, client), ignore)
        except UnknownRule as exc:
            raise BackendError(
                f"@pytest.mark.redirect_audit: unknown rule {exc.name!r} ({exc.known})"
            ) from None
        parts = []
        if fail_on is not None:
            floor = _severity(fail_on)
            failing = gate([r for r in shown if r["rule_id"] not in expected], floor, self.known)
            parts.append(self._listed(failing, "new finding", f"at or above {floor}", chain=True))
        happened = {r["rule_id"] for r in self._test_records(test, client)}
        missing = [rule for rule in expected if rule not in happened]
        if missing:
            from analyzer.detectors import RULES

            slugs = {r.id: r.slug for r in RULES}
            parts.append(
                "redirect-audit: the test expected "
                + ", ".join(f"{rule} {slugs[rule]}" for rule in missing)
                + " (@pytest.mark.redirect_audit(expect=...)), but "
                + ("it did not happen" if len(missing) == 1 else "they did not happen")
                + " during this test"
            )
        return "\n".join(p for p in parts if p)

    def _test_records(self, test: str, client: str) -> list[Record]:
        """Every finding of the test, suppressed or not (test_findings reads them)."""
        self.test_findings(test, client)
        return self._found.get((test, client), [])

    def findings_text(self, test: str, client: str, min_severity: str) -> Json:
        """The `redirect_audit.assert_no_findings()` message ("" when nothing is found)."""
        from analyzer.report import finding_lines
        from analyzer.text import counted

        found = self.test_findings(test, client, min_severity)
        if not found:
            return ""
        lines = [
            f"redirect-audit: {counted(len(found), 'finding')} at or above {min_severity} during this test:"
        ]
        for f in found:  # as `findings` prints them, and the command that shows the chain
            lines += finding_lines(f)
            if f["chain_id"] is not None:
                lines.append(f"       the chain: {self._command(f['chain_id'])}")
        return "\n".join(lines)

    def _listed(self, found: list[Record], noun: str, what: str, chain: bool) -> str:
        from analyzer.text import counted

        if not found:
            return ""
        lines = [f"redirect-audit: {counted(len(found), noun)} {what} during this test:"]
        for f in found:
            lines += self._described(f, chain=chain)
        return "\n".join(lines)

    def _described(self, f: Record, chain: bool) -> list[str]:
        from analyzer.report import hop_text

        lines = [
            f"  {f['severity'].upper()} {f['rule_id']} {f['rule']}: {hop_text(f)}",
            f"    {f['message']}",
        ]
        if chain and f["chain_id"] is not None:
            lines.append(f"    chain {f['chain_id']}: {self._command(f['chain_id'])}")
        return lines

    def _command(self, chain_id: int) -> str:
        from analyzer.storeread import shown

        return f"{self._prefix()} chains --db {shlex.quote(shown(self.db))} --chain {chain_id}"

    @staticmethod
    def _prefix() -> str:
        return "uv run redirect-audit" if os.environ.get("UV_RUN_RECURSION_DEPTH") else "redirect-audit"

    # ---- the session's end -----------------------------------------------------------------

    def seen(self, labels: list[str]) -> Json:
        """How many clients the session (its recorders' labels) recorded."""
        return len(self._seen(labels))

    def _seen(self, labels: list[str]) -> list[Any]:
        from analyzer.recorded import clients_seen

        clients, recorders = self._session_clients(labels)
        with self._store() as store:
            return clients_seen(store, clients=clients, prefixes=[f"proxy:{r}/" for r in recorders])

    def summary(
        self,
        labels: list[str],
        recorder_lost: bool,
        tls_refused: dict[str, int],
        tls_upstream_failed: dict[str, int],
        unproxied: list[str],
        allow_empty: bool,
    ) -> Json:
        """The lines of the terminal summary: what the session recorded and could not see,
        then its findings grouped by test, each with the command that shows its chain."""
        from analyzer import recorded
        from analyzer.report import hop_text
        from analyzer.text import counted

        where = f"a fresh store, {self._shown()}" if self.fresh else self._shown()
        seen = self._seen(labels)
        lines = [recorded.recorded_line(seen)]
        if recorder_lost:
            lines.append(
                "The recorder stopped answering before the session ended: its last exchanges may be missing."
            )
        lines += recorded.tls_lines(tls_refused, tls_upstream_failed)
        if unproxied:
            lines.append(recorded.unproxied_line(sorted(unproxied)))
        if not seen:
            lines.append(f"Nothing was judged (store: {where}), so this is not an all-clear. It may be that:")
            lines += [
                f"  - {reason}"
                for reason in recorded.empty_reasons(
                    refused=tls_refused, unproxied=len(unproxied), pytest=True
                )
            ]
            verdict = "passes" if allow_empty else "exits 2"
            lines.append(
                f"The session {verdict}; --redirect-audit-allow-empty accepts a session that records nothing."
            )
            return lines
        records = self._session_findings(labels)
        if self._suppressed:
            from analyzer.selection import suppressed_summary

            lines.append(
                suppressed_summary(self._suppressed).replace("--show-suppressed lists them", self._listing())
            )
        if not records:
            lines.append(f"No findings in this session's traffic (store: {where}).")
            return lines
        by_test: dict[str, list[Record]] = {}
        for r in records:
            by_test.setdefault(r["test"] or "(outside any test)", []).append(r)
        for test, found in by_test.items():
            lines.append(f"{test}: {counted(len(found), 'finding')}")
            for f in found:
                lines.append(f"  {f['severity'].upper():<6} {f['rule_id']} {f['rule']}: {hop_text(f)}")
                if f["chain_id"] is not None:
                    lines.append(f"         {self._command(f['chain_id'])}")
        tests = sum(1 for t in by_test if t != "(outside any test)")
        lines.append(f"{counted(len(records), 'finding')} in {counted(tests, 'test')}; store: {where}")
        return lines

    def _listing(self) -> str:
        return f"`{self._prefix()} findings --show-suppressed --db {shlex.quote(self._shown())}` lists them"

    def _shown(self) -> str:
        from analyzer.storeread import shown

        return shown(self.db)

    def _session_findings(self, labels: list[str]) -> list[Record]:
        from analyzer.analysis import AnalysisOptions, analyze
        from analyzer.report import finding_records
        from analyzer.storeread import open_reader

        with self._store() as store:
            analyze(store, AnalysisOptions.from_dict(self.thresholds))
        clients, recorders = self._session_clients(labels)
        with open_reader(self.db) as reader:
            records = finding_records(reader)
        prefixes = tuple(f"proxy:{r}/" for r in recorders)
        mine = [r for r in records if r["client"] in clients or (r["client"] or "").startswith(prefixes)]
        shown, self._suppressed = self._select(mine)
        return shown

    def _session_clients(self, labels: list[str]) -> tuple[set[str], set[str]]:
        """(the labels this session's traffic was recorded under, the names of its recorders)."""
        from sqlalchemy import select

        from analyzer.store import test_runs

        with self._store() as store, store.begin() as conn:
            rows = conn.execute(
                select(test_runs.c.client, test_runs.c.recorder)
                .distinct()
                .where(test_runs.c.session == self.session)
            ).all()
        recorders = {r for _, r in rows} | set(labels)
        return {c for c, _ in rows} | recorders, recorders


def _warm_up() -> None:
    """Import what storing the first captures needs (mitmproxy's flow classes, the
    converter) while the tests run, not when the session hands them over at its end."""
    import threading

    def load() -> None:
        import analyzer.ingest.flows
        import analyzer.ingest.recorder  # noqa: F401

    threading.Thread(target=load, name="redirect-audit-warm-up", daemon=True).start()


class _Direct:
    """The test process's own captures, stored by the backend itself: the flows the
    recorder's `/record` would make of them (ingest.flows.flow_of_capture), the same
    converter and the same writer (a capture of this process's own), without a proxy to
    start or wait for."""

    def __init__(self, store: Store, label: str, keep_bodies: bool = False) -> None:
        from analyzer.ingest.common import CaptureOptions
        from analyzer.ingest.flows import MITMPROXY_VERSION, FlowConverter
        from analyzer.ingest.recorder import Recorder

        self.recorder = Recorder(store, creator=f"mitmproxy {MITMPROXY_VERSION} (pytest, in process)")
        options = CaptureOptions(keep_bodies=keep_bodies)
        self.converter = FlowConverter(0, store.secret_key, options, recorder=f"proxy:{label}")
        self.refused = 0
        self.closed = False

    def add(self, captures: list[dict[str, Any]]) -> None:
        import logging

        from analyzer.ingest.flows import flow_of_capture
        from analyzer.text import printable

        recorder, converter = self.recorder, self.converter
        for capture in captures:  # one that cannot be made a flow costs only itself
            try:
                flow = flow_of_capture(capture)
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                self.refused += 1
                logging.getLogger(__name__).warning(
                    "redirect-audit: an exchange recorded in process was not kept: %s",
                    printable(str(exc))[:200],
                )
                continue
            if recorder.capture_id is not None:
                converter.capture_id = recorder.capture_id  # the writer made it: rows carry it from now on
            recorder.submit(converter.convert(recorder.next_seq(), flow))

    def flush(self, timeout: float = 60.0) -> None:
        import time

        target = self.recorder.flush_soon()
        deadline = time.monotonic() + timeout
        while self.recorder.handled < target and time.monotonic() < deadline and not self.recorder.closed:
            time.sleep(0.002)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.recorder.close()


class _Kept:
    """`with` on the store the backend keeps open: nothing to close after each use."""

    def __init__(self, store: Store):
        self.store = store

    def __enter__(self) -> Store:
        return self.store

    def __exit__(self, *exc: object) -> None:
        return None


def _epoch(iso_text: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso_text.replace("Z", "+00:00")).timestamp()


def _severity(name: str) -> Severity:
    from analyzer.model import Severity

    return Severity.parse(name)


CALLS = frozenset(
    name for name, value in vars(Backend).items() if callable(value) and not name.startswith("_")
)


def dispatch(backend: Backend, call: str, args: dict[str, Any]) -> dict[str, Any]:
    """One call, answered as `serve` answers it over the pipe."""
    if call not in CALLS:
        return {"error": f"redirect-audit {__version__} has no call {call!r}", "kind": "internal"}
    try:
        return {"ok": getattr(backend, call)(**args)}
    except BackendError as exc:
        return {"error": str(exc), "kind": exc.kind}
    except Exception as exc:  # answered, not raised: the test process says what went wrong
        import traceback

        traceback.print_exc()  # to the backend's stderr, which the plugin shows when it gives up
        return {"error": f"internal error in redirect-audit: {type(exc).__name__}: {exc}", "kind": "internal"}


def serve(calls: BinaryIO | None = None, answers: BinaryIO | None = None) -> int:
    """`redirect-audit pytest-backend`: answer calls, one JSON line each, until stdin closes
    (the test process ended) or a `close` call. Stray output (a library that prints) goes
    to stderr: stdout carries answers only."""
    if answers is None:
        answers = os.fdopen(os.dup(1), "wb", buffering=0)
        os.dup2(2, 1)
        sys.stdout = sys.stderr
    calls = calls or sys.stdin.buffer
    backend = Backend()
    try:
        for line in calls:
            call = ""
            try:
                message = json.loads(line)
                call, args = str(message["call"]), dict(message.get("args") or {})
            except (ValueError, KeyError, TypeError, AttributeError):
                answer: dict[str, Any] = {"error": f"not a call: {line[:80]!r}", "kind": "internal"}
            else:
                answer = dispatch(backend, call, args)
            answers.write(json.dumps(answer).encode() + b"\n")
            if call == "close":
                break
    finally:
        backend.close()
    return 0
