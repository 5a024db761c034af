"""`analyze`: chains and findings, client by client, and only for clients with news.

Linking, the per-chain rules and duplicate writes never look across clients (a chain is
one client's, design.md), so the store is analyzed a batch of clients at a time: the
redirects of those clients, the requests that could have followed them, and their
writes that repeat, never more. Batches go through `--jobs` worker processes, each
reading from the store itself; this process writes each batch's results in a
transaction of its own, replacing that batch's clients' earlier results. Memory is one
batch (about BATCH_EXCHANGES exchanges' worth of redirects), whatever the store holds.

Incremental: `analyzed_captures` remembers how many exchanges of each capture the last
analysis read. Only the clients of exchanges added since are analyzed again; when the
options change, everything is. Ids are stable: a chain's id is its root exchange's id,
and a finding keeps its id from one run to the next (found by rule and exchanges, or,
for a stale redirect, by its source and target).

Stale temporary redirects are the one rule across clients (a month of a fleet's
sightings of one source -> target): a streaming aggregate over the temporary redirects
in (source, target) order, for the groups that gained sightings (all of them after a
full run), with the rule's own accumulator (detectors.stale_temporary_redirect).
"""

from __future__ import annotations

import gc
import hashlib
import json
import math
import multiprocessing
import re
import signal
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

from sqlalchemy import (
    ColumnElement,
    FromClause,
    Select,
    Table,
    and_,
    delete,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.engine import Connection, Engine

from analyzer.chains import Link, LinkOptions, follow_up_urls, needs_other_forms, stored_id
from analyzer.detectors import DetectorOptions
from analyzer.detectors import stale_temporary_redirect as stale
from analyzer.detectors.base import WRITE_METHODS
from analyzer.errors import ReportedError
from analyzer.forking import start_method
from analyzer.gcpause import cycle_collection_paused
from analyzer.model import REDIRECT_STATUSES, Chain, Exchange, Finding
from analyzer.party import Parties, is_page_client
from analyzer.store import (
    LINK_COLUMNS,
    STALE_RECHECK,
    STATISTICS_AFTER,
    Store,
    analyzed_captures,
    insert_tuples,
    light_exchange,
    load_exchanges,
    make_engine,
    meta,
    read_generation,
    record_analysis,
    refresh_statistics,
)
from analyzer.store import (
    analysis_checkpoints as checkpoints_t,
)
from analyzer.store import (
    captures as captures_t,
)
from analyzer.store import (
    chains as chains_t,
)
from analyzer.store import (
    exchanges as ex_t,
)
from analyzer.store import (
    findings as findings_t,
)
from analyzer.store import (
    hops as hops_t,
)
from analyzer.storeread import ANALYSIS_ENGINE, ANALYSIS_OPTIONS, Row
from analyzer.windows import LOOKAHEAD, ChainStream, Flushed, Snapshot, read_snapshot, resume, snapshot

FindingRow = dict[str, Any]  # a findings row as inserted
FindingKey = tuple[Any, ...]  # what makes a finding the same one in the next analysis
CaptureCounts = dict[int, tuple[int, int | None]]  # capture id -> (exchanges, highest seq)

# Aliases of the exchanges table, made once: each alias SQLAlchemy makes registers proxies
# of every column that outlive it, about 60 KB a batch (200 KB a batch in all, 140 MB over
# the 720 batches of 360k clients).
REDIRECT = ex_t.alias("redirect")
SOURCE = ex_t.alias("source")

ID_CHUNK = 500  # ids or clients per IN (...) list: well under every backend's parameter limit
BATCH_EXCHANGES = 200_000  # exchanges of the clients analyzed together
WINDOW_EXCHANGES = 25_000  # a batch bigger than this is read in time windows of about this many
COLLECT_SECONDS = 5.0  # of analysis between two passes of the cycle collector (one costs ~0.1 s)
STREAM_ROWS = 2000  # rows fetched at a time where a query streams
RESULTS_LOCK = 0x7265_6469_7201  # PostgreSQL advisory lock: one analysis writes results at a time
TEMPORARY_STATUSES = (302, 303, 307)


@dataclass(frozen=True)
class AnalysisOptions:
    link: LinkOptions = field(default_factory=LinkOptions)
    detect: DetectorOptions = field(default_factory=DetectorOptions)

    def as_dict(self) -> dict[str, float]:
        """The options as stored with the results, so that a re-analysis on its own uses them
        again; with the engine's revision, so that results of an older engine count as stale."""
        d = self.detect
        return {
            "engine": ANALYSIS_ENGINE,
            "link_window": self.link.window,
            "stale_after_days": d.stale_after_days,
            "duplicate_window": d.duplicate_window,
            "max_redirects": d.max_redirects,
        }

    @classmethod
    def from_dict(cls, stored: dict[str, Any] | None) -> AnalysisOptions:
        """Options stored by as_dict(); what is missing or unreadable takes its default."""
        stored = stored or {}
        defaults = cls().as_dict()
        values = {k: stored[k] if isinstance(stored.get(k), int | float) else v for k, v in defaults.items()}
        try:
            return cls(
                link=LinkOptions(window=values["link_window"]),
                detect=DetectorOptions(
                    stale_after_days=values["stale_after_days"],
                    duplicate_window=values["duplicate_window"],
                    max_redirects=int(values["max_redirects"]),
                ),
            )
        except ValueError:
            return cls()


@dataclass
class AnalysisResult:
    """What the store holds after an analysis, and what this one did. `chains` and
    `findings` are the objects made by this run (only with analyze(keep=True))."""

    chain_count: int = 0
    hop_count: int = 0
    by_severity: Counter[str] = field(default_factory=Counter)
    clients_analyzed: int = 0
    clients_total: int | None = None  # counted in a full analysis only
    full: bool = True
    chains: list[Chain] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)

    @property
    def finding_count(self) -> int:
        return sum(self.by_severity.values())


def analyze(
    store: Store,
    options: AnalysisOptions = AnalysisOptions(),
    *,
    jobs: int = 1,
    full: bool = False,
    keep: bool = False,
    batch_exchanges: int = BATCH_EXCHANGES,
    window_exchanges: int = WINDOW_EXCHANGES,
) -> AnalysisResult:
    """Bring chains and findings up to date with the store.

    Only clients with exchanges added since the last analysis are analyzed again, unless
    `full` or the options differ from the last analysis's. `jobs` > 1 analyzes batches in
    that many worker processes. `keep` also returns this run's Chain and Finding objects
    (in one process). The results are recorded as describing the store's generation as
    it was before anything was read, so exchanges committed meanwhile make them stale.
    """
    with cycle_collection_paused():
        with store.begin() as conn:
            generation = read_generation(conn)
            stored_options = conn.execute(select(meta.c.value).where(meta.c.key == ANALYSIS_OPTIONS)).scalar()
            recheck = conn.execute(select(meta.c.value).where(meta.c.key == STALE_RECHECK)).scalar() == "all"
            seen_before = {
                cid: (n, top)
                for cid, n, top in conn.execute(
                    select(
                        analyzed_captures.c.capture_id,
                        analyzed_captures.c.exchanges,
                        analyzed_captures.c.max_seq,
                    )
                )
            }
            full = (
                full
                or not seen_before
                or stored_options is None
                or json.loads(stored_options) != options.as_dict()
            )
            now = _capture_counts(conn)
            batches: Sequence[list[str]]
            sizes: dict[str, int] = {}
            if full:  # every client: held packed, a batch's names unpacked in its turn
                packed = _PackedBatches.read(conn, batch_exchanges)
                batches, analyzed = packed, packed.clients
            else:  # only the clients with news are counted: no pass over every client
                dirty = _dirty_clients(conn, now, seen_before)
                sizes = _client_sizes(conn, sorted(dirty))
                batches = list(_batches(sorted(dirty), sizes, batch_exchanges))
                analyzed = len(dirty)
        result = AnalysisResult(
            full=full, clients_analyzed=analyzed, clients_total=analyzed if full else None
        )
        groups: set[tuple[str, str]] = set()
        where: dict[int, tuple[Chain, int]] = {}
        ids = _FindingIds()
        plan = _WindowPlan(sizes, window_exchanges, options.link, None if full else (now, seen_before))
        collected = time.monotonic()
        for out in _run_batches(store, batches, options, jobs, keep, plan):
            with store.begin() as conn:
                lock_results(conn)
                _replace(conn, out, ids)
            stored_checkpoint, out.checkpoint = out.checkpoint, None  # its bytes go now, not next turn
            if time.monotonic() - collected >= COLLECT_SECONDS:
                # The cycle collector is paused for speed, but a few thousand objects a window
                # do form cycles (database cursors, snapshots): left, they grew a 10M-exchange
                # run by ~6 MB a million. A pass every few seconds: by count, a store cut
                # into thousands of tiny windows (the tests) paid a pass per ten of them; after
                # every checkpoint, a short incremental run paid ~0.2 s a pass for its three.
                gc.collect()
                collected = time.monotonic()
            del stored_checkpoint
            if not full:  # a full run judges every group anyway: no need to hold their names
                groups |= out.groups
            if keep:
                result.chains.extend(out.chains)
                result.findings.extend(out.findings)
                where.update(
                    (stored_id(hop.source), (chain, hop.index)) for chain in out.chains for hop in chain.hops
                )
        with store.begin() as conn:
            lock_results(conn)
            if full:
                _drop_orphans(conn)
            found = stale_findings(
                conn, None if full or recheck else groups, options.detect, ids, where if keep else None
            )
            if recheck:
                conn.execute(delete(meta).where(meta.c.key == STALE_RECHECK))
            result.findings.extend(found)
            conn.execute(delete(analyzed_captures))
            if now:
                conn.execute(
                    insert(analyzed_captures),
                    [{"capture_id": cid, "exchanges": n, "max_seq": top} for cid, (n, top) in now.items()],
                )
            record_analysis(conn, generation, options.as_dict())
            if full or sum(sizes.values()) >= STATISTICS_AFTER:
                refresh_statistics(conn, "chains", "hops", "findings")
            _count_results(conn, result)
    if keep:
        result.chains.sort(key=lambda c: _order(c.root))
        result.findings.sort(key=lambda f: (*_order(f.exchange), f.rule_id))
    return result


def _order(ex: Exchange) -> tuple[float, int, int]:
    return (ex.started_at or 0.0, ex.capture_id, ex.seq)


def _count_results(conn: Connection, result: AnalysisResult) -> None:
    result.chain_count = conn.execute(select(func.count()).select_from(chains_t)).scalar() or 0
    result.hop_count = conn.execute(select(func.count()).select_from(hops_t)).scalar() or 0
    result.by_severity = Counter(
        dict(conn.execute(select(findings_t.c.severity, func.count()).group_by(findings_t.c.severity)).all())
    )


def lock_results(conn: Connection) -> None:
    """One writer of results at a time, for the rest of this transaction (SQLite: its write
    lock, taken at once so no read-then-write upgrade can fail; PostgreSQL: an advisory lock)."""
    if conn.dialect.name == "sqlite":
        conn.exec_driver_sql("BEGIN IMMEDIATE")
    elif conn.dialect.name == "postgresql":
        conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({RESULTS_LOCK})")


# ---- what to analyze ----------------------------------------------------------------


PER_CAPTURE_LOOKUPS = 2000  # up to this many captures, each one's highest seq is one index probe


def _capture_counts(conn: Connection) -> dict[int, tuple[int, int | None]]:
    """Each capture's exchange count (kept by every writer in `captures.entries`, in the
    transaction that writes the exchanges) and highest seq: one probe of the (capture, seq)
    index per capture, instead of a pass over every exchange (PostgreSQL cannot count from
    an index until VACUUM has run)."""
    entries = dict(conn.execute(select(captures_t.c.id, captures_t.c.entries)).all())
    if len(entries) > PER_CAPTURE_LOOKUPS:
        rows = conn.execute(
            select(ex_t.c.capture_id, func.count(), func.max(ex_t.c.seq)).group_by(ex_t.c.capture_id)
        )
        return {cid: (n, top) for cid, n, top in rows}
    out = {}
    for cid, count in entries.items():
        top = conn.execute(select(func.max(ex_t.c.seq)).where(ex_t.c.capture_id == cid)).scalar()
        if top is not None:
            out[cid] = (count, top)
    return out


def _client_sizes(conn: Connection, clients: list[str]) -> dict[str, int]:
    """Exchanges per client, of these."""
    counted = select(ex_t.c.client, func.count()).group_by(ex_t.c.client)
    sizes: dict[str, int] = {}
    for start in range(0, len(clients), ID_CHUNK):
        sizes.update(conn.execute(counted.where(ex_t.c.client.in_(clients[start : start + ID_CHUNK]))).all())
    return sizes


def _dirty_clients(conn: Connection, now: CaptureCounts, before: CaptureCounts) -> set[str]:
    """Clients with exchanges the last analysis did not read. A capture only grows at its
    end (one writer per capture: an import's transaction, a proxy run's writer), so its new
    exchanges are those past the highest seq seen; a capture that shrank or gained rows
    elsewhere has all its clients analyzed again. Clients whose captures were removed lose
    their results in `captures remove` (store.remove_captures)."""
    dirty: set[str] = set()
    for cid, (count, top) in now.items():
        seen = before.get(cid)
        if seen == (count, top):
            continue
        of_capture = ex_t.c.capture_id == cid
        if seen is not None and count > seen[0] and seen[1] is not None:
            newer = and_(of_capture, ex_t.c.seq > seen[1])
            if conn.execute(select(func.count()).where(newer)).scalar() == count - seen[0]:
                dirty.update(conn.execute(select(ex_t.c.client).where(newer).distinct()).scalars())
                continue
        dirty.update(conn.execute(select(ex_t.c.client).where(of_capture).distinct()).scalars())
    return dirty


class Batch(list[str]):
    """A batch's clients, with the exchanges they hold between them."""

    exchanges: int = 0


class _PackedBatches(Sequence[Batch]):
    """Every client of the store in batches (as `_batches` makes them, in the same order),
    each batch's names packed into one string until its turn: at 10M exchanges over 360k
    addresses (over a million client ids) a map of every client's size, a set and a sorted
    list of them were most of a full run's peak (~160 bytes a client; packed, ~40)."""

    def __init__(self) -> None:
        # (the names joined by NUL, the exchanges); stored text never holds a NUL: the store
        # writes one as the four characters `\x00` on every engine (store.exchange_row)
        self.packed: list[tuple[str, int]] = []
        self.clients = 0

    @classmethod
    def read(cls, conn: Connection, limit: int) -> _PackedBatches:
        """One pass over every client's size, in code-point order (Python's `sorted`, so
        the batches and the new findings' ids are those a sorted list of clients gave):
        SQLite's binary collation; PostgreSQL sorts its groups by "C"."""
        out = cls()
        client = ex_t.c.client if conn.dialect.name == "sqlite" else ex_t.c.client.collate("C")
        counted = select(ex_t.c.client, func.count()).group_by(ex_t.c.client).order_by(client)
        names: list[str] = []
        total = 0
        for name, size in conn.execute(counted.execution_options(yield_per=STREAM_ROWS)):
            if names and (total + size > limit or len(names) >= ID_CHUNK):
                out._add(names, total)
                names, total = [], 0
            names.append(name)
            total += size
        if names:
            out._add(names, total)
        return out

    def _add(self, names: list[str], total: int) -> None:
        self.packed.append(("\0".join(names), total))
        self.clients += len(names)

    def __len__(self) -> int:
        return len(self.packed)

    def __getitem__(self, i: int) -> Batch:  # type: ignore[override]  # one batch at a time, never a slice
        names, total = self.packed[i]
        batch = Batch(names.split("\0"))
        batch.exchanges = total
        return batch


def _batches(clients: Sequence[str], sizes: dict[str, int], limit: int) -> Iterator[list[str]]:
    """Clients in groups of about `limit` exchanges (a bigger client alone) and at most ID_CHUNK."""
    batch: list[str] = []
    total = 0
    for client in clients:
        size = sizes.get(client, 0)
        if batch and (total + size > limit or len(batch) >= ID_CHUNK):
            yield batch
            batch, total = [], 0
        batch.append(client)
        total += size
    if batch:
        yield batch


# ---- one batch of clients -------------------------------------------------------------


@dataclass
class BatchOutput:
    clients: list[str]
    chain_rows: list[Row] = field(default_factory=list)
    hop_rows: list[Row] = field(default_factory=list)
    finding_rows: list[FindingRow] = field(default_factory=list)
    groups: set[tuple[str, str]] = field(default_factory=set)  # (source, target) of its temporary redirects
    chains: list[Chain] = field(default_factory=list)  # with keep only
    findings: list[Finding] = field(default_factory=list)
    replaces: bool = True  # the batch's first output: it takes the place of the clients' earlier results
    revised_rows: list[FindingRow] = field(default_factory=list)  # findings of earlier outputs, changed
    resumed: Resumed | None = None  # taken up at a checkpoint: remove what came after it first
    checkpoint: tuple[float, bytes] | None = None  # the state after this output's window


Window = tuple[float | None, float | None]  # [lo, hi) of start times; None: unbounded
WHOLE: tuple[Window, ...] = ((None, None),)


def analyze_clients(
    conn: Connection, clients: list[str], options: AnalysisOptions, keep: bool = False
) -> BatchOutput:
    """Chains, hops and findings of these clients in one window, as rows (and objects with `keep`)."""
    (out,) = analyze_batch(conn, clients, options, keep=keep)
    return out


def analyze_batch(
    conn: Connection,
    clients: list[str],
    options: AnalysisOptions,
    windows: Sequence[Window] = WHOLE,
    keep: bool = False,
    *,
    resumed: Resumed | None = None,
    checkpoints: Sequence[float] = (),
) -> Iterator[BatchOutput]:
    """These clients' results, one output per time window (analyzer.windows): memory is
    one window's exchanges and what is still open at its end, not the batch's.

    `resumed`: the analysis taken up at a checkpoint (its first output removes what was
    found after it); `checkpoints`: the window boundaries to keep the state at (one
    client, no pages), each stored with the output of the window it ends."""
    if resumed is None:
        stream = ChainStream(options.link, options.detect, _navigations(conn, clients))
    else:
        stream = resume(options.link, options.detect, resumed.state, lambda ids: _whole(conn, ids))
    load = WindowLoader(conn, clients, options.link)
    for n, (lo, hi) in enumerate(windows):
        flushed = stream.window(*load.window(lo, hi), hi)
        out = batch_output(clients, flushed, keep, replaces=n == 0 and resumed is None)
        if n == 0:
            out.resumed = resumed
        if hi is not None and hi in checkpoints:  # stored with the results it follows
            out.checkpoint = (hi, snapshot(stream, hi))
        yield out
        del flushed, out


@dataclass
class Resumed:
    """An analysis taken up at a checkpoint: what it removes before adding its results."""

    state: Snapshot
    chains: list[int]  # chains open at the checkpoint (rooted before it)


def _whole(conn: Connection, ids: list[int]) -> dict[int, Exchange]:
    found: dict[int, Exchange] = {}
    for start in range(0, len(ids), ID_CHUNK):
        found.update(
            (stored_id(ex), ex) for ex in load_exchanges(conn, ex_t.c.id.in_(ids[start : start + ID_CHUNK]))
        )
    return found


def batch_output(clients: list[str], flushed: Flushed, keep: bool, replaces: bool) -> BatchOutput:
    out = BatchOutput(clients, replaces=replaces)
    for chain in flushed.chains:
        root = chain.root
        out.chain_rows.append(
            (root.id, root.id, len(chain.hops), chain.end, root.client, root.started_at, chain.third_party)
        )
        for hop in chain.hops:
            source = hop.source
            out.hop_rows.append(
                (
                    root.id,
                    hop.index,
                    source.id,
                    hop.target.id if hop.target else None,
                    source.status,
                    hop.link,
                    hop.confidence,
                )
            )
            target = source.location_resolved or source.location
            if stale.is_temporary(source) and target:
                out.groups.add((source.url_norm, target))
    out.finding_rows = [finding_row(f) for f in flushed.findings]
    out.revised_rows = [finding_row(f) for f in flushed.revised]
    if keep:
        out.chains, out.findings = flushed.chains, flushed.findings
    return out


class WindowLoader:
    """What one time window of a batch needs from the store (analyzer.windows, module doc).
    With the window (None, None), the batch's whole history, dated or not."""

    def __init__(self, conn: Connection, clients: list[str], options: LinkOptions) -> None:
        self.conn = conn
        self.clients = clients
        self.options = options

    def of(self, *conditions: ColumnElement[bool], table: Table = ex_t) -> ColumnElement[bool]:
        return and_(*conditions, table.c.client.in_(self.clients))

    def reach(self, hi: float | None) -> float | None:
        """Up to where a window's redirects' follow-ups, and their retries, can start."""
        return None if hi is None else hi + self.options.window + LOOKAHEAD

    def window(
        self, lo: float | None, hi: float | None
    ) -> tuple[
        list[Exchange],
        list[Exchange],
        list[Exchange],
        Callable[[dict[int, Link]], dict[int, Exchange]],
        Callable[[], list[Exchange]],
    ]:
        """What ChainStream.window reads for `[lo, hi)`: redirects, later redirects,
        candidates, and the loaders of follow-ups and writes."""
        redirects, later = self.redirects(lo, hi)
        return (
            redirects,
            later,
            self.candidates(redirects, lo, hi),
            lambda links: self.follow_ups(redirects, links),
            lambda: self.writes(lo, hi),
        )

    def redirects(self, lo: float | None, hi: float | None) -> tuple[list[Exchange], list[Exchange]]:
        """The window's redirects, whole; and the later ones its follow-ups may precede on
        their connection (light)."""
        redirects = load_exchanges(
            self.conn, self.of(ex_t.c.status.in_(REDIRECT_STATUSES), *between(ex_t, lo, hi))
        )
        later: list[Exchange] = []
        if hi is not None:
            later = load_exchanges(
                self.conn,
                self.of(
                    ex_t.c.status.in_(REDIRECT_STATUSES),
                    ex_t.c.connection.is_not(None),
                    *between(ex_t, hi, None),
                    ex_t.c.started_at <= hi + self.options.window,
                ),
                light=True,
            )
        return redirects, later

    def candidates(self, redirects: list[Exchange], lo: float | None, hi: float | None) -> list[Exchange]:
        """The requests to the URLs the window's redirects point at, up to its reach."""
        found = _candidates(self.conn, self.clients, lo, hi, self.reach(hi))
        wanted: dict[str, set[str]] = {}
        for ex in needs_other_forms(redirects, found, self.options):
            for url in islice(follow_up_urls(ex), 1, None):
                wanted.setdefault(ex.client, set()).add(url)
        have = {stored_id(ex) for ex in found}
        for client, urls in wanted.items():
            ordered = sorted(urls)
            for start in range(0, len(ordered), ID_CHUNK):
                chunk = ordered[start : start + ID_CHUNK]
                where = and_(
                    ex_t.c.client == client, ex_t.c.url_norm.in_(chunk), *between(ex_t, lo, self.reach(hi))
                )
                for ex in load_exchanges(self.conn, where, light=True):
                    if stored_id(ex) not in have:
                        have.add(stored_id(ex))
                        found.append(ex)
        return found

    def follow_ups(self, redirects: list[Exchange], links: dict[int, Link]) -> dict[int, Exchange]:
        """The linked requests that are not among the window's redirects, whole."""
        mine = {stored_id(ex) for ex in redirects}
        missing = sorted({link.target_id for link in links.values()} - mine)
        found: dict[int, Exchange] = {}
        for start in range(0, len(missing), ID_CHUNK):
            chunk = missing[start : start + ID_CHUNK]
            found.update((stored_id(ex), ex) for ex in load_exchanges(self.conn, ex_t.c.id.in_(chunk)))
        return found

    def writes(self, lo: float | None, hi: float | None) -> list[Exchange]:
        """Accepted writes that may repeat (bodies, not headers). The whole history: those
        whose (method, body) occurs twice; a window: all of its own, since a repeat may
        lie in another window (one that does not repeat is judged alone, and passes)."""
        where: ColumnElement[bool]
        if lo is None and hi is None:
            where = ex_t.c.id.in_(repeated_writes(self.clients))
        else:
            where = self.of(*accepted_writes(), *between(ex_t, lo, hi))
        return load_exchanges(self.conn, where, headers=False)


def between(table: FromClause, lo: float | None, hi: float | None) -> list[ColumnElement[bool]]:
    """Start in [lo, hi); no bound where None (and then undated exchanges too)."""
    conditions = []
    if lo is not None:
        conditions.append(table.c.started_at >= lo)
    if hi is not None:
        conditions.append(table.c.started_at < hi)
    return conditions


def _candidates(
    conn: Connection,
    clients: list[str] | None,
    lo: float | None = None,
    hi: float | None = None,
    reach: float | None = None,
) -> list[Exchange]:
    """The requests of these clients, starting in [lo, reach), to a URL one of their
    redirects starting in [lo, hi) pointed at.

    SQLite: a join from each redirect to its own client's requests to that URL, through
    the (client, URL, start) index, so a URL every client visits costs a batch its own
    clients' visits only, and a window its own time's. PostgreSQL: the batch's requests
    whose URL is among the batch's targets (a hash semi-join over the batch, planned from
    statistics); the join above made it walk every visit of a popular URL once per
    redirect to it, through the URL index.
    """
    if conn.dialect.name != "sqlite":
        mine = ex_t.c.client.in_(clients) if clients is not None else None

        def of(*conditions: ColumnElement[bool]) -> ColumnElement[bool]:
            return and_(*conditions, mine) if mine is not None else and_(*conditions)

        targets = select(ex_t.c.location_resolved).where(
            of(
                ex_t.c.status.in_(REDIRECT_STATUSES),
                ex_t.c.location_resolved.is_not(None),
                *between(ex_t, lo, hi),
            )
        )
        return load_exchanges(conn, of(ex_t.c.url_norm.in_(targets), *between(ex_t, lo, reach)), light=True)
    redirect = REDIRECT
    pointed_at = select(redirect.c.client, redirect.c.location_resolved).where(
        redirect.c.status.in_(REDIRECT_STATUSES),
        redirect.c.location_resolved.is_not(None),
        *between(redirect, lo, hi),
    )
    if clients is not None:
        pointed_at = pointed_at.where(redirect.c.client.in_(clients))
    # Each (client, target) once: 3,000 identical redirects to a URL the client visited
    # 3,000 times would otherwise join into 9 million rows (a hostile HAR took 40 s).
    pairs = pointed_at.distinct().subquery("pairs")
    joined = pairs.join(
        ex_t,
        and_(
            ex_t.c.client == pairs.c.client,
            ex_t.c.url_norm == pairs.c.location_resolved,
            *between(ex_t, lo, reach),
        ),
    )
    stmt = select(*(ex_t.c[name] for name in LINK_COLUMNS)).select_from(joined)
    seen: dict[int, Exchange] = {}
    for row in conn.execute(stmt):
        if row[0] not in seen:  # one row per redirect that points at it
            seen[row[0]] = light_exchange(row)
    return list(seen.values())


class _StoredPages:
    """First-party sites of browser pages, read from the stored chains as needed (for the
    findings judged across clients: a stale redirect's latest sighting)."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.known: dict[str, Parties] = {}

    def third_party(self, ex: Exchange, target: str | None) -> bool | None:
        if not is_page_client(ex.client):
            return None
        parties = self.known.get(ex.client)
        if parties is None:
            navigations = _navigations(self.conn, [ex.client])
            urls = {}
            for nav in navigations:
                follow_ups = select(ex_t.c.url_norm).join(hops_t, hops_t.c.to_exchange_id == ex_t.c.id)
                urls[nav.client] = [
                    nav.url,
                    *self.conn.execute(follow_ups.where(hops_t.c.chain_id == nav.id)).scalars(),
                ]
            parties = self.known[ex.client] = Parties.of_urls(urls)
        return parties.third_party_hop(ex.client, ex, target)


def _navigations(conn: Connection, clients: list[str]) -> list[Exchange]:
    """The first exchange of each browser page among these clients (analyzer.party)."""
    pages = [c for c in clients if is_page_client(c)]
    found: list[Exchange] = []
    for start in range(0, len(pages), ID_CHUNK):
        chunk = pages[start : start + ID_CHUNK]
        order = func.row_number().over(
            partition_by=ex_t.c.client, order_by=(ex_t.c.started_at, ex_t.c.capture_id, ex_t.c.seq)
        )
        ranked = select(ex_t.c.id, order.label("n")).where(ex_t.c.client.in_(chunk)).subquery()
        found += load_exchanges(conn, ex_t.c.id.in_(select(ranked.c.id).where(ranked.c.n == 1)), light=True)
    return found


def accepted_writes() -> list[ColumnElement[bool]]:
    """Conditions of an accepted write with a body (what detectors.duplicate_write judges)."""
    return [
        ex_t.c.method.in_(WRITE_METHODS),
        ex_t.c.status >= 200,
        ex_t.c.status < 300,
        ex_t.c.req_body_sha256.is_not(None),
        ex_t.c.req_body_len > 0,
    ]


def accepted_write(ex: Exchange) -> bool:
    """accepted_writes() on one exchange."""
    body = ex.request_body
    return (
        ex.method in WRITE_METHODS
        and ex.status is not None
        and 200 <= ex.status < 300
        and body.sha256 is not None
        and (body.length or 0) > 0
    )


def repeated_writes(clients: list[str] | None = None) -> Select[tuple[int]]:
    """Ids of accepted writes whose (client, method, body hash) occurs more than once.

    Only these can be duplicate deliveries, so only these are loaded. A window count over
    the accepted writes: one scan and a sort whatever the table statistics say (a
    GROUP BY joined back to the table ran as a quadratic nested loop on PostgreSQL right
    after a bulk load, before autovacuum had analyzed the table). Portable SQL.
    """
    accepted = accepted_writes()
    if clients is not None:
        accepted.append(ex_t.c.client.in_(clients))
    counted = (
        select(
            ex_t.c.id,
            func.count().over(partition_by=(ex_t.c.client, ex_t.c.method, ex_t.c.req_body_sha256)).label("n"),
        )
        .where(*accepted)
        .subquery()
    )
    return select(counted.c.id).where(counted.c.n > 1)


def finding_row(finding: Finding) -> FindingRow:
    source = finding.chain.hops[finding.hop].source if finding.chain else finding.exchange
    return {
        "rule": finding.rule,
        "rule_id": finding.rule_id,
        "severity": str(finding.severity),
        "severity_rank": int(finding.severity),
        "confidence": finding.confidence,
        "message": finding.message,
        "chain_id": finding.chain.id if finding.chain else None,
        "hop": finding.hop,
        "from_exchange_id": source.id,
        "to_exchange_id": finding.exchange.id,
        "observed_at": finding.exchange.started_at,
        "evidence": json.dumps(finding.evidence, sort_keys=True),
        "fingerprint": finding_fingerprint(finding.rule, source, finding.exchange),
        "client": finding.exchange.client,
        "third_party": finding.third_party,
    }


# A secret value as the store keeps it: its keyed fingerprint, which differs from store to
# store (each has its own key). A baseline compares it by where it stands, not by value.
_STORED_SECRET = re.compile(r"hmac:[0-9a-f]{32}")


def finding_fingerprint(rule: str, source: Exchange, target: Exchange) -> str:
    """Stable identity of a finding across captures, re-imports, stores and machines, for
    baselines: secret values count by the parameter that holds them, never by their
    fingerprint under one store's key."""
    parts = [rule, str(source.status), source.method, target.method, source.url_norm, target.url_norm]
    text = _STORED_SECRET.sub("hmac:*", "\x1f".join(parts))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


# ---- running the batches ----------------------------------------------------------------


def _run_batches(
    store: Store,
    batches: Sequence[list[str]],
    options: AnalysisOptions,
    jobs: int,
    keep: bool,
    plan: _WindowPlan,
) -> Iterator[BatchOutput]:
    """Each batch's outputs, in the batches' order. A batch bigger than a window is read
    window by window in this process; the others go to `jobs` workers."""
    if jobs <= 1 or len(batches) < 2 or keep:
        for clients in batches:
            yield from _inline(store, clients, options, keep, plan)
        return
    yield from _parallel(store, batches, options, jobs, plan)


def _inline(
    store: Store, clients: list[str], options: AnalysisOptions, keep: bool, plan: _WindowPlan
) -> Iterator[BatchOutput]:
    with store.engine.connect() as conn:
        _snapshot(conn)
        resumed = _resumable(conn, clients, plan) if plan.news is not None and not keep else None
        windows: Sequence[Window] = WHOLE
        if resumed is not None:
            windows = plan.windows(conn, clients, since=resumed.state.boundary)
        if windows == WHOLE:  # not taken up (an undated exchange keeps a batch in one piece)
            resumed = None
            windows = plan.windows(conn, clients)
        yield from analyze_batch(
            conn, clients, options, windows, keep, resumed=resumed, checkpoints=_checkpoints(clients, windows)
        )


def _resumable(conn: Connection, clients: list[str], plan: _WindowPlan) -> Resumed | None:
    """The latest checkpoint of this client that its new exchanges could not have changed
    (None: none, or the client is not alone, or a new exchange is undated)."""
    if len(clients) != 1 or not plan.windowed(clients):
        return None
    client = clients[0]
    now, before = plan.news or ({}, {})
    newer = []
    for cid, (count, top) in now.items():
        seen = before.get(cid)
        if seen == (count, top):
            continue
        if seen is None:
            newer.append(ex_t.c.capture_id == cid)
        elif count > seen[0] and seen[1] is not None:
            newer.append(and_(ex_t.c.capture_id == cid, ex_t.c.seq > seen[1]))
        else:
            return None  # the capture changed otherwise: from the start
    if not newer:
        return None
    first, undated = conn.execute(
        select(func.min(ex_t.c.started_at), func.count() - func.count(ex_t.c.started_at)).where(
            ex_t.c.client == client, or_(*newer)
        )
    ).one()
    if first is None or undated:
        return None
    # The latest checkpoint whose state no new exchange could change (Snapshot.horizon);
    # none at or after `first` - link window can qualify. A client keeps a few.
    for (blob,) in conn.execute(
        select(checkpoints_t.c.state)
        .where(checkpoints_t.c.client == client, checkpoints_t.c.boundary < first - plan.link.window)
        .order_by(checkpoints_t.c.boundary.desc())
    ):
        state = read_snapshot(blob)
        if state.horizon(plan.link) < first:
            break
    else:
        return None
    return Resumed(state, [cid for _, cid in state.open])


@dataclass
class _WindowPlan:
    """Where a batch is cut into time windows of about `exchanges` exchanges each."""

    sizes: dict[str, int]
    exchanges: int
    link: LinkOptions = field(default_factory=LinkOptions)
    news: tuple[CaptureCounts, CaptureCounts] | None = None  # incremental: captures now and as last read

    def windowed(self, clients: list[str]) -> bool:
        if isinstance(clients, Batch):  # a full run's: its size came with it
            return clients.exchanges > self.exchanges
        return sum(self.sizes.get(c, 0) for c in clients) > self.exchanges

    def reach(self) -> float:
        """How late an exchange can be and still change a window's results (its reads)."""
        return self.link.window + LOOKAHEAD

    def windows(self, conn: Connection, clients: list[str], since: float | None = None) -> Sequence[Window]:
        """Cut points at distinct start times, one after every `exchanges` exchanges (from
        `since` on), and three near the last exchange, where checkpoints let appended
        traffic be analyzed from there. One window when the batch
        is smaller, or holds an undated exchange (it could be linked to any later
        request, so no window would hold its follow-up)."""
        if since is None and not self.windowed(clients):
            return WHOLE
        mine = ex_t.c.client.in_(clients)
        if conn.execute(select(ex_t.c.id).where(mine, ex_t.c.started_at.is_(None)).limit(1)).first():
            return WHOLE
        starts = (
            select(ex_t.c.started_at).where(mine, *between(ex_t, since, None)).order_by(ex_t.c.started_at)
        )
        cuts: list[float] = []
        count, last = 0, None
        for (start,) in conn.execute(starts.execution_options(yield_per=STREAM_ROWS)):
            if count >= self.exchanges and start != last:
                cuts.append(start)
                count = 0
            count += 1
            last = start
        if last is None:
            return [(since, None)]
        # Checkpoints near the end, among the other cuts (the windows stay as small): just
        # over a window's whole reach before the last exchange, the one appended traffic can
        # always take up from; just over the link window before it, unless a denied
        # follow-up's retry reaches further (Snapshot.horizon); and just after it, for
        # traffic that comes after a pause of a link window or more.
        near = {last - self.reach() - 1.0, last - self.link.window - 1.0, math.nextafter(last, math.inf)}
        merged = sorted(set(cuts) | {cut for cut in near if since is None or cut > since})
        kept: list[float] = []
        out = Windows()
        lo = since
        for cut in merged:
            # a checkpoint with no exchange since the cut before would keep the same state
            # as that cut's, with a later horizon
            if (
                cut in near
                and not conn.execute(select(ex_t.c.id).where(mine, *between(ex_t, lo, cut)).limit(1)).first()
            ):
                continue
            if cut in near:
                kept.append(cut)
            out.append((lo, cut))
            lo = cut
        out.append((lo, None))
        out.checkpoints = kept
        return out


class Windows(list[Window]):
    """A batch's windows, and the boundaries near its end whose state is worth keeping."""

    def __init__(self) -> None:
        super().__init__()
        self.checkpoints: list[float] = []


CHECKPOINTS_KEPT = 3  # a client's checkpoints kept: the (up to) three near its end (_WindowPlan.windows)


def _checkpoints(clients: list[str], windows: Sequence[Window]) -> list[float]:
    """The boundaries to keep the state at, those near the end (Windows.checkpoints), for
    one client that is not a browser page (pages are HAR imports, taken whole)."""
    if len(clients) != 1 or is_page_client(clients[0]) or not isinstance(windows, Windows):
        return []
    return (
        windows.checkpoints[max(0, len(windows.checkpoints) - CHECKPOINTS_KEPT) :] if CHECKPOINTS_KEPT else []
    )


def _snapshot(conn: Connection) -> None:
    """The batch's queries read one state of the store (SQLite: a read transaction;
    PostgreSQL: REPEATABLE READ), not one per query while writers commit."""
    if conn.dialect.name == "sqlite":
        conn.exec_driver_sql("BEGIN")
    elif conn.dialect.name == "postgresql":
        conn.exec_driver_sql("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")


_worker: dict[str, Engine] = {}


def _init_worker(url: str) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is this process's parent's to handle
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    _worker["engine"] = make_engine(url)


def _analyze_in_worker(clients: list[str], options: AnalysisOptions) -> BatchOutput:
    with cycle_collection_paused(), _worker["engine"].connect() as conn:
        _snapshot(conn)
        return analyze_clients(conn, clients, options)


def _parallel(
    store: Store, batches: Sequence[list[str]], options: AnalysisOptions, jobs: int, plan: _WindowPlan
) -> Iterator[BatchOutput]:
    """Batches through worker processes, results in the batches' order (so that new
    finding ids come out the same whatever finishes first), at most 2 x jobs in flight;
    a windowed batch in this process when its turn comes."""
    context = multiprocessing.get_context(start_method())
    with ProcessPoolExecutor(
        jobs, mp_context=context, initializer=_init_worker, initargs=(store.url,)
    ) as pool:
        pending: deque[Future[BatchOutput] | list[str]] = deque()

        def settle(item: Future[BatchOutput] | list[str]) -> Iterator[BatchOutput]:
            if isinstance(item, list):
                yield from _inline(store, item, options, False, plan)
            else:
                yield item.result()

        try:
            for clients in batches:
                if plan.windowed(clients):
                    pending.append(clients)
                else:
                    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
                    try:  # the first submit forks the workers: they must not get Ctrl-C
                        pending.append(pool.submit(_analyze_in_worker, clients, options))
                    finally:
                        signal.pthread_sigmask(signal.SIG_SETMASK, held)
                if len(pending) > 2 * jobs:
                    yield from settle(pending.popleft())
            while pending:
                yield from settle(pending.popleft())
        finally:
            for item in pending:  # Ctrl-C or a failure: what was not started is dropped
                if not isinstance(item, list):
                    item.cancel()


# ---- writing a batch's results -----------------------------------------------------------


class _FindingIds:
    """Finding ids kept across runs: a finding found again takes the id it had."""

    def __init__(self) -> None:
        self.by_key: dict[FindingKey, int] = {}
        self.highest = 0

    def remember(self, key: FindingKey, finding_id: int) -> None:
        self.by_key[key] = finding_id
        self.highest = max(self.highest, finding_id)

    def take(
        self, conn: Connection, rows: list[FindingRow], key_of: Callable[[FindingRow], FindingKey]
    ) -> None:
        top = max(self.highest, conn.execute(select(func.max(findings_t.c.id))).scalar() or 0)
        for row in rows:
            kept = self.by_key.pop(key_of(row), None)
            if kept is None:
                top += 1
                kept = top
            row["id"] = kept
        self.highest = max(self.highest, top)


def _key(row: FindingRow) -> FindingKey:
    return (row["rule"], row["from_exchange_id"], row["to_exchange_id"], row["hop"])


REVISABLE = ("severity", "severity_rank", "confidence", "message", "evidence")  # what more deliveries change
CHAIN_COLUMNS = ("id", "root_exchange_id", "hops", "end_reason", "client", "started_at", "third_party")
HOP_COLUMNS = ("chain_id", "idx", "from_exchange_id", "to_exchange_id", "status", "link", "confidence")


def _old_findings() -> Select[Any]:
    """Stored findings with what keys them (_key; a stale one by its source and target)."""
    source = SOURCE
    return select(
        findings_t.c.id,
        findings_t.c.rule,
        findings_t.c.from_exchange_id,
        findings_t.c.to_exchange_id,
        findings_t.c.hop,
        source.c.url_norm,
        func.coalesce(source.c.location_resolved, source.c.location),
    ).join(source, source.c.id == findings_t.c.from_exchange_id)


def _remember(ids: _FindingIds, rows: Iterable[Row]) -> list[int]:
    """Remember the ids of _old_findings() rows by key; returns them."""
    found = []
    for fid, rule, from_id, to_id, hop, url, target in rows:
        ids.remember((rule, url, target) if rule == stale.SLUG else (rule, from_id, to_id, hop), fid)
        found.append(fid)
    return found


def _replace(conn: Connection, out: BatchOutput, ids: _FindingIds) -> None:
    """Put a batch's results in place of its clients' earlier ones (findings on their
    chains included, stale ones too: those are judged again after the batches); a later
    window's output of the batch adds to its first. Every
    statement goes through an index: chains by client, findings by client and by chain,
    hops and findings by primary key."""
    old_findings = _old_findings()
    for start in range(0, len(out.clients) if out.replaces else 0, ID_CHUNK):
        chunk = out.clients[start : start + ID_CHUNK]
        old_chains = list(conn.execute(select(chains_t.c.id).where(chains_t.c.client.in_(chunk))).scalars())
        doomed: set[int] = set()
        queries = [old_findings.where(findings_t.c.client.in_(chunk))]
        queries += [
            old_findings.where(findings_t.c.chain_id.in_(old_chains[i : i + ID_CHUNK]))
            for i in range(0, len(old_chains), ID_CHUNK)
        ]
        for query in queries:
            doomed.update(_remember(ids, conn.execute(query)))
        _delete_ids(conn, findings_t, findings_t.c.id, sorted(doomed))
        _delete_ids(conn, hops_t, hops_t.c.chain_id, old_chains)
        _delete_ids(conn, chains_t, chains_t.c.id, old_chains)
    if out.replaces:
        _delete_ids(conn, checkpoints_t, checkpoints_t.c.client, out.clients)
    if out.resumed is not None:
        _cut(conn, out.clients[0], out.resumed, ids)
    if out.checkpoint is not None:  # the newest few of the client's checkpoints are kept
        client, (boundary, state) = out.clients[0], out.checkpoint
        conn.execute(insert(checkpoints_t).values(client=client, boundary=boundary, state=state))
        older = (
            select(checkpoints_t.c.boundary)
            .where(checkpoints_t.c.client == client)
            .order_by(checkpoints_t.c.boundary.desc())
            .offset(CHECKPOINTS_KEPT)
        )
        for (stale_boundary,) in conn.execute(older).all():
            conn.execute(
                delete(checkpoints_t).where(
                    checkpoints_t.c.client == client, checkpoints_t.c.boundary == stale_boundary
                )
            )
    insert_tuples(conn, chains_t, CHAIN_COLUMNS, out.chain_rows)
    insert_tuples(conn, hops_t, HOP_COLUMNS, out.hop_rows)
    if out.finding_rows:
        ids.take(conn, out.finding_rows, _key)
        conn.execute(insert(findings_t), out.finding_rows)
    for row in out.revised_rows:  # by its key, through the from-exchange index
        conn.execute(
            update(findings_t)
            .where(
                findings_t.c.from_exchange_id == row["from_exchange_id"],
                findings_t.c.to_exchange_id == row["to_exchange_id"],
                findings_t.c.rule == row["rule"],
                findings_t.c.hop == row["hop"],
            )
            .values({name: row[name] for name in REVISABLE})
        )


def _cut(conn: Connection, client: str, resumed: Resumed, ids: _FindingIds) -> None:
    """Remove a client's results from after a checkpoint: the chains open at it or rooted
    after it, and the findings at or after its frontier (the rest was settled before it),
    remembering their ids for the findings found again."""
    state = resumed.state
    at, capture, seq = state.frontier
    later = or_(
        ex_t.c.started_at > at,
        and_(
            ex_t.c.started_at == at,
            or_(ex_t.c.capture_id > capture, and_(ex_t.c.capture_id == capture, ex_t.c.seq >= seq)),
        ),
    )
    doomed = (
        select(
            findings_t.c.id,
            findings_t.c.rule,
            findings_t.c.from_exchange_id,
            findings_t.c.to_exchange_id,
            findings_t.c.hop,
        )
        .join(ex_t, ex_t.c.id == findings_t.c.to_exchange_id)
        .where(findings_t.c.client == client, later)
    )
    gone = []
    for fid, rule, from_id, to_id, hop in conn.execute(doomed):
        ids.remember((rule, from_id, to_id, hop), fid)
        gone.append(fid)
    _delete_ids(conn, findings_t, findings_t.c.id, gone)
    chains = list(
        conn.execute(
            select(chains_t.c.id).where(chains_t.c.client == client, chains_t.c.started_at >= state.boundary)
        ).scalars()
    )
    chains += resumed.chains
    _delete_ids(conn, hops_t, hops_t.c.chain_id, chains)
    _delete_ids(conn, chains_t, chains_t.c.id, chains)
    conn.execute(
        delete(checkpoints_t).where(
            checkpoints_t.c.client == client, checkpoints_t.c.boundary > state.boundary
        )
    )


def _delete_ids(conn: Connection, table: Table, column: ColumnElement[Any], values: Sequence[Any]) -> None:
    for start in range(0, len(values), ID_CHUNK):
        conn.execute(delete(table).where(column.in_(values[start : start + ID_CHUNK])))


def _drop_orphans(conn: Connection) -> None:
    """After a full run: results of clients that no longer have exchanges (and findings
    of a schema-1 store, which carry no client), so nothing outlives its data."""
    # NOT EXISTS, not NOT IN: PostgreSQL hashes a NOT IN list only within work_mem, and past
    # it re-reads the list for every chain (at 10M exchanges it did not finish).
    still = select(ex_t.c.id).where(ex_t.c.client == chains_t.c.client).exists()
    gone = select(chains_t.c.id).where(~still)
    conn.execute(
        delete(findings_t).where(
            or_(
                findings_t.c.chain_id.in_(gone),
                and_(findings_t.c.client.is_(None), findings_t.c.rule != stale.SLUG),
            )
        )
    )
    conn.execute(delete(hops_t).where(hops_t.c.chain_id.in_(gone)))
    conn.execute(delete(chains_t).where(chains_t.c.id.in_(gone)))


# ---- results computed elsewhere (analyzer.distributed) ----------------------------------


class ResultsMismatch(ReportedError):
    """The results were computed from other exchanges than the store holds now."""


def check_exchanges(store: Store, exchanges: tuple[int, int | None]) -> None:
    """Refuse (ResultsMismatch) results from other exchanges than the store holds."""
    with store.begin() as conn:
        _check_exchanges(conn, exchanges)


def _check_exchanges(conn: Connection, exchanges: tuple[int, int | None]) -> None:
    here = tuple(conn.execute(select(func.count(), func.max(ex_t.c.id)).select_from(ex_t)).one())
    if here != tuple(exchanges):
        raise ResultsMismatch(
            f"the results were computed from {exchanges[0]:,} exchanges (highest id {exchanges[1]}), "
            f"and the store holds {here[0]:,} (highest id {here[1]}) now: export the store again "
            "and analyze that export; the store's results are unchanged"
        )


ResultChunk = tuple[list[Row], list[Row], list[FindingRow]]  # chains, hops, findings (stale ones too)


def replace_results(
    store: Store,
    chunks: Iterable[ResultChunk],
    options: AnalysisOptions,
    exchanges: tuple[int, int | None],
) -> AnalysisResult:
    """Put a full analysis computed elsewhere (on a cluster, from a Parquet export of this
    store) in place of every stored result, in one transaction, as a full `analyze` would
    leave them: finding ids kept for the findings found again, the analysis recorded as
    current. `exchanges`: the (count, highest id) of the exchanges the results came from;
    when the store holds others now, nothing is changed (ResultsMismatch)."""
    result = AnalysisResult(full=True)
    with cycle_collection_paused(), store.begin() as conn:
        lock_results(conn)
        generation = read_generation(conn)
        _check_exchanges(conn, exchanges)
        ids = _FindingIds()
        _remember(ids, conn.execute(_old_findings()))
        for table in (findings_t, hops_t, chains_t, checkpoints_t):
            conn.execute(delete(table))
        clients: set[str] = set()
        for chain_rows, hop_rows, finding_rows in chunks:
            insert_tuples(conn, chains_t, CHAIN_COLUMNS, chain_rows)
            insert_tuples(conn, hops_t, HOP_COLUMNS, hop_rows)
            clients.update(row[4] for row in chain_rows)
            for rows, key in (
                ([r for r in finding_rows if r["rule"] != stale.SLUG], _key),
                ([r for r in finding_rows if r["rule"] == stale.SLUG], _stale_key),
            ):
                if rows:
                    ids.take(conn, rows, key)
                    conn.execute(insert(findings_t), rows)
        conn.execute(delete(analyzed_captures))
        now = _capture_counts(conn)
        if now:
            conn.execute(
                insert(analyzed_captures),
                [{"capture_id": cid, "exchanges": n, "max_seq": top} for cid, (n, top) in now.items()],
            )
        record_analysis(conn, generation, options.as_dict())
        refresh_statistics(conn, "chains", "hops", "findings")
        _count_results(conn, result)
        result.clients_analyzed = len(clients)
    return result


# ---- stale temporary redirects: across clients, as a stream -----------------------------

_SIGHTING_COLUMNS = (
    ex_t.c.id,
    ex_t.c.capture_id,
    ex_t.c.seq,
    ex_t.c.client,
    ex_t.c.url_norm,
    ex_t.c.location,
    ex_t.c.location_resolved,
    ex_t.c.status,
    ex_t.c.method,
    ex_t.c.synthetic,
    ex_t.c.started_at,
    ex_t.c.response_headers,
)


def stale_findings(
    conn: Connection,
    groups: set[tuple[str, str]] | None,
    options: DetectorOptions,
    ids: _FindingIds,
    where: dict[int, tuple[Chain, int]] | None = None,
) -> list[Finding]:
    """Judge the (source, target) groups of temporary redirects (all when `groups` is None)
    and store their findings in place of the groups' earlier ones. Sightings stream in
    (source, target) order, so one group's summary is held at a time."""
    target_of = func.coalesce(ex_t.c.location_resolved, ex_t.c.location)
    temporary = and_(ex_t.c.status.in_(TEMPORARY_STATUSES), target_of.is_not(None))
    old = (
        select(findings_t.c.id, ex_t.c.url_norm, target_of)
        .join(ex_t, ex_t.c.id == findings_t.c.from_exchange_id)
        .where(findings_t.c.rule == stale.SLUG)
    )
    if groups is None:
        queries = [select(*_SIGHTING_COLUMNS).where(temporary)]
        olds = [old]
    else:
        sources = sorted({source for source, _ in groups})
        chunks = [sources[i : i + ID_CHUNK] for i in range(0, len(sources), ID_CHUNK)]
        # By URL alone, so that the URL index is the one that applies (with the statuses in the
        # condition too, SQLite planned by its status index: every temporary redirect read per
        # chunk, 0.2 s a chunk on 1M exchanges); sighting_groups() keeps the temporary ones.
        queries = [select(*_SIGHTING_COLUMNS).where(ex_t.c.url_norm.in_(c)) for c in chunks]
        olds = [old.where(ex_t.c.url_norm.in_(c)) for c in chunks]
    pages = _StoredPages(conn)
    doomed = []
    for query in olds:
        for fid, source, target in conn.execute(query):
            if groups is None or (source, target) in groups:
                ids.remember((stale.SLUG, source, target), fid)
                doomed.append(fid)
    _delete_ids(conn, findings_t, findings_t.c.id, doomed)
    rows: list[FindingRow] = []
    found: list[Finding] = []
    for query in queries:
        ordered = query.order_by(ex_t.c.url_norm, target_of, ex_t.c.started_at, ex_t.c.capture_id, ex_t.c.seq)
        for (source, target), sightings in sighting_groups(
            conn.execute(ordered.execution_options(yield_per=STREAM_ROWS))
        ):
            if groups is not None and (source, target) not in groups:
                continue
            judged = stale.judge(source, target, sightings, options)
            if judged is None or sightings.latest is None:  # streamed sightings always have one
                continue
            message, evidence = judged
            finding = stale.stale_finding(message, evidence, sightings.latest, None, 0)
            finding.third_party = pages.third_party(finding.exchange, target)
            row = finding_row(finding)
            row["client"] = None  # across clients
            rows.append(row)
            if where is not None:
                found.append(finding)
            if len(rows) >= STREAM_ROWS:  # stored as they come: a fleet's month can hold many
                _store_stale(conn, rows, ids)
                rows = []
    _store_stale(conn, rows, ids)
    for finding in found:  # `found` is only filled when `where` is given
        assert where is not None
        finding.chain, finding.hop = where.get(stored_id(finding.exchange), (None, 0))
    return found


def _store_stale(conn: Connection, rows: list[FindingRow], ids: _FindingIds) -> None:
    """Insert stale findings, each on the hop where its latest sighting was served."""
    if not rows:
        return
    wanted = [row["from_exchange_id"] for row in rows]
    at: dict[int, tuple[int, int]] = {}
    for start in range(0, len(wanted), ID_CHUNK):
        at.update(
            (ex_id, (chain_id, idx))
            for ex_id, chain_id, idx in conn.execute(
                select(hops_t.c.from_exchange_id, hops_t.c.chain_id, hops_t.c.idx).where(
                    hops_t.c.from_exchange_id.in_(wanted[start : start + ID_CHUNK])
                )
            )
        )
    for row in rows:
        row["chain_id"], row["hop"] = at.get(row["from_exchange_id"], (None, 0))
    ids.take(conn, rows, _stale_key)
    conn.execute(insert(findings_t), rows)


def stale_history(conn: Connection) -> dict[tuple[str, str], stale.Sightings]:
    """The store's temporary redirects summarized per (source, target), as the live rule
    needs them: counts, statuses and first/last sighting by a GROUP BY, and the soonest
    Retry-After and longest cache lifetime from the rows whose headers name either (the
    only headers it reads). What the proxy loads at start-up, instead of the history."""
    target_of = func.coalesce(ex_t.c.location_resolved, ex_t.c.location)
    temporary = and_(ex_t.c.status.in_(TEMPORARY_STATUSES), target_of.is_not(None))
    kind = (ex_t.c.url_norm, target_of, ex_t.c.status, ex_t.c.method, ex_t.c.synthetic)
    summary: dict[tuple[str, str], stale.Sightings] = {}
    for source, target, status, method, synthetic, count, first, last in conn.execute(
        select(*kind, func.count(), func.min(ex_t.c.started_at), func.max(ex_t.c.started_at))
        .where(temporary)
        .group_by(*kind)
    ):
        probe = Exchange(
            capture_id=0,
            seq=0,
            method=method,
            url=source,
            url_norm=source,
            status=status,
            synthetic=bool(synthetic),
        )
        if stale.is_temporary(probe):
            summary.setdefault((source, target), stale.Sightings()).count_sighting(
                status, last, times=count, first=first
            )
    named = or_(
        *(
            func.lower(ex_t.c.response_headers).like(f"%{name}%")
            for name in ("retry-after", "cache-control", "expires")
        )
    )
    rows = select(ex_t.c.url_norm, target_of, ex_t.c.started_at, ex_t.c.response_headers).where(
        temporary, named
    )
    for source, target, started, headers in conn.execute(rows.execution_options(yield_per=STREAM_ROWS)):
        group = summary.get((source, target))
        if group is not None:
            group.note_headers(
                Exchange(
                    capture_id=0,
                    seq=0,
                    method="GET",
                    url=source,
                    url_norm=source,
                    started_at=started,
                    response_headers=[tuple(h) for h in json.loads(headers)],
                )
            )
    return summary


def _stale_key(row: FindingRow) -> FindingKey:
    evidence = json.loads(row["evidence"])
    return (stale.SLUG, evidence["source"], evidence["target"])


def sighting_groups(rows: Iterable[Row]) -> Iterator[tuple[tuple[str, str], stale.Sightings]]:
    """Consecutive sightings of one (source, target), summarized as they pass."""
    key: tuple[str, str] | None = None
    summary: stale.Sightings | None = None
    for row in rows:
        (
            ex_id,
            capture_id,
            seq,
            client,
            url_norm,
            location,
            resolved,
            status,
            method,
            synthetic,
            started,
            response_headers,
        ) = row
        ex = Exchange(
            id=ex_id,
            capture_id=capture_id,
            seq=seq,
            client=client,
            url=url_norm,
            url_norm=url_norm,
            method=method,
            status=status,
            location=location,
            location_resolved=resolved,
            synthetic=bool(synthetic),
            started_at=started,
        )
        if not stale.is_temporary(ex) or not (resolved or location):
            continue
        if response_headers:
            ex.response_headers = [tuple(h) for h in json.loads(response_headers)]
        here = (url_norm, resolved or location)
        if key is not None and summary is not None and here != key:
            yield key, summary
        if here != key or summary is None:
            key, summary = here, stale.Sightings()
        summary.add(ex)
    if key is not None and summary is not None:
        yield key, summary


__all__ = [
    "AnalysisOptions",
    "AnalysisResult",
    "accepted_write",
    "analyze",
    "analyze_batch",
    "analyze_clients",
    "finding_fingerprint",
    "lock_results",
    "repeated_writes",
    "replace_results",
    "stale_findings",
    "stale_history",
]
