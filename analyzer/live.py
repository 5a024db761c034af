"""Live analysis: link hops and run the rules while the proxy is still running.

`LiveAnalyzer.add()` takes each exchange as its response (or error) comes in and
returns the findings it makes known. It follows the rules `analyze` follows, on the
slice of traffic that is still open:

* a redirect with a usable `Location` waits for its follow-up: the next request of the
  same client to the resolved URL, starting after it and within the link window (on
  the redirect's own connection first, unless it has carried another redirect of the
  client since, then the earliest waiting redirect);
* when a chain ends (a final answer, an error, a redirect with no usable Location, or
  a redirect nobody followed within the window) the chain rules run on it;
* an accepted write is checked against the same client's recent writes (`duplicate-
  write`), and a temporary redirect against its earlier sightings, this run's and the
  store's (`stale-temporary-redirect`).

Every decision is one of `analyze`'s, made with less hindsight: only when the same
request could have followed two identical redirects can the two disagree on which
hop it belongs to.

What is kept is a window, not a history, so the proxy runs in flat memory however long
it records (benchmarks/bench_live_memory.py):

* a redirect waits at most the link window (30 s); a followed one lets go of its chain
  at once;
* a write is kept for the duplicate window (600 s), and only its first deliveries
  (KEPT_DELIVERIES) with the chain each arrived by, then a count;
* a temporary redirect is kept as its (source, target) summary (Sightings, without the
  exchange), under a 16-byte digest of the pair.

On top of the windows each kind is capped at LIVE_LIMIT entries: traffic that would
hold more (a load test of unique redirects nobody follows) lets go of its oldest
entries, counted in `trimmed`. What is let go is never judged wrongly, only not judged
live: `analyze` reads the store, where every exchange is, and finds what live missed.
"""

from __future__ import annotations

import hashlib
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from analyzer.analysis import AnalysisOptions
from analyzer.chains import follow_up_urls, grade_link, is_followable, order_key, unfollowed_end
from analyzer.detectors import RULES, duplicate_write, run_detectors, stale_temporary_redirect
from analyzer.detectors.base import Context, site
from analyzer.detectors.stale_temporary_redirect import Sightings
from analyzer.model import Chain, Exchange, Finding, Hop

CHAIN_RULES = tuple(
    rule for rule in RULES if rule.slug not in (duplicate_write.SLUG, stale_temporary_redirect.SLUG)
)
PENDING = "pending"
# One logical write: (client, method, target, body digest)
WriteKey = tuple[str, str, str, str | None]
Arrival = tuple[Chain, int]  # the chain a request arrived by, and the index of its hop
LIVE_LIMIT = 10_000  # waiting redirects, writes, redirect pairs: the most of each kept
KEPT_DELIVERIES = 8  # deliveries of one write kept to judge it; later ones are counted


@dataclass(slots=True)
class _Waiting:
    """A redirect waiting for its follow-up, and the chain it ends for now."""

    redirect: Exchange
    chain: Chain | None  # None once followed or given up: the chain has moved on
    moved_on: bool = False  # its connection has carried another redirect of the client since
    urls: tuple[str, ...] = ()  # the follow-up URLs it waits under (chains.follow_up_urls)


@dataclass(slots=True)
class _WriteGroup:
    deliveries: list[Exchange] = field(default_factory=list)
    arrivals: dict[int, Arrival] = field(default_factory=dict)  # of the deliveries kept
    count: int = 0
    reported: bool = False


def pair_key(source: str, target: str) -> bytes:
    """A redirect pair as the live stale rule keys it: 16 bytes, whatever the URLs' length."""
    return hashlib.blake2b(f"{source}\n{target}".encode("utf-8", "surrogatepass"), digest_size=16).digest()


class LiveAnalyzer:
    def __init__(
        self,
        options: AnalysisOptions = AnalysisOptions(),
        history: Iterable[Exchange] | dict[tuple[str, str], Sightings] = (),
    ):
        """`history`: what the store holds of temporary redirects, for the stale rule: its
        summary per (source, target) (analysis.stale_history), or the redirects themselves."""
        self.options = options
        self.window = options.link.window
        self._next_id = 1
        # waiting redirects by (client, target URL); a redirect that is waiting always has a target
        self._waiting: dict[tuple[str, str | None], list[_Waiting]] = {}
        self._expiry: deque[_Waiting] = deque()  # in arrival order
        self._on_connection: dict[
            tuple[str, str | None], list[_Waiting]
        ] = {}  # waiting, by (client, connection)
        self._waiting_count = 0  # redirects waiting now (_expiry also holds followed ones until they expire)
        self._writes: dict[WriteKey, _WriteGroup] = {}  # in the order each group began
        # the stale rule's summaries, least recently sighted first, and the pairs reported
        self._sightings: dict[bytes, Sightings] = {}
        self._stale_reported: dict[bytes, None] = {}
        self.trimmed = {"redirects": 0, "writes": 0, "redirect pairs": 0}  # let go of by LIVE_LIMIT
        if isinstance(history, dict):
            latest_last = sorted(history.items(), key=lambda item: item[1].last or 0.0)[-LIVE_LIMIT:]
            self.trimmed["redirect pairs"] += len(history) - len(latest_last)
            for (source, target), sightings in latest_last:
                sightings.latest = None  # a summary: the finding points at the live sighting
                self._sightings[pair_key(source, target)] = sightings
        else:
            for ex in history:
                self._sight(ex)
        # The Public Suffix List snapshot takes ~30 ms to load: load it now, at start-up,
        # not on the proxy's event loop when the first credential finding needs a site.
        site("localhost")

    # ---- the one entry point -------------------------------------------------

    def add(self, ex: Exchange, now: float | None = None) -> list[Finding]:
        """Take one finished exchange; return the findings it completes."""
        ex.id = self._next_id
        self._next_id += 1
        found = self.expire(now if now is not None else ex.started_at)
        waiting = self._claim(ex)
        arrival: Arrival | None = None
        if waiting is not None:
            chain = waiting.chain
            assert chain is not None  # a claimed redirect is still waiting
            waiting.chain = None
            source = waiting.redirect
            how, confidence = grade_link(source, ex, ambiguous=False)
            chain.hops[-1] = Hop(len(chain.hops) - 1, source, ex, how, confidence)
            arrival = (chain, len(chain.hops) - 1)
            self.linked(chain, arrival[1])
        elif ex.is_redirect:
            chain = Chain(hops=[], end=PENDING)
        else:
            chain = None
        if ex.is_redirect and ex.connection is not None:
            self._moved_on(ex)
        if chain is not None:
            if ex.is_redirect:
                found += self._continue(chain, ex)
            else:
                chain.end = "final" if ex.status is not None else "error"
                found += self._chain_done(chain)
        found += self._check_write(ex, arrival)
        return found

    def linked(self, chain: Chain, hop: int) -> None:
        """Called when a request is linked as the follow-up of `chain.hops[hop]` (for tests)."""

    def expire(self, now: float | None = None) -> list[Finding]:
        """End the chains whose last redirect was not followed within the window."""
        now = time.time() if now is None else now
        found: list[Finding] = []
        while self._expiry and (
            self._expiry[0].chain is None or (self._expiry[0].redirect.started_at or 0.0) + self.window < now
        ):
            found += self._give_up(self._expiry.popleft())
        self._forget_old(now)
        return found

    def close(self) -> list[Finding]:
        """End every open chain (the proxy is stopping)."""
        found: list[Finding] = []
        while self._expiry:
            found += self._give_up(self._expiry.popleft())
        return found

    # ---- chains --------------------------------------------------------------

    def _claim(self, ex: Exchange) -> _Waiting | None:
        key = (ex.client, ex.url_norm)
        queue = self._waiting.get(key)
        if not queue:
            return None
        me = order_key(ex)
        eligible = [
            w
            for w in queue
            if order_key(w.redirect) < me
            and (
                ex.started_at is None
                or w.redirect.started_at is None
                or ex.started_at - w.redirect.started_at <= self.window
            )
        ]
        if not eligible:
            return None
        same = [
            w
            for w in eligible
            if w.redirect.connection is not None and w.redirect.connection == ex.connection and not w.moved_on
        ]
        chosen = min(same or eligible, key=lambda w: order_key(w.redirect))
        self._unwait(chosen)
        self._off_connection(chosen)
        self._waiting_count -= 1
        return chosen

    def _unwait(self, waiting: _Waiting) -> None:
        """Take a redirect out of every queue it waits in."""
        for url in waiting.urls:
            key = (waiting.redirect.client, url)
            queue = self._waiting.get(key)
            if queue is not None and waiting in queue:
                queue.remove(waiting)
                if not queue:
                    del self._waiting[key]

    def _continue(self, chain: Chain, ex: Exchange) -> list[Finding]:
        found = self._sighted(chain, ex)
        if is_followable(ex):
            chain.hops.append(Hop(len(chain.hops), ex, None, PENDING, 0.0))
            waiting = _Waiting(ex, chain, urls=tuple(follow_up_urls(ex)))
            for url in waiting.urls:
                self._waiting.setdefault((ex.client, url), []).append(waiting)
            self._expiry.append(waiting)
            self._waiting_count += 1
            if ex.connection is not None:
                self._on_connection.setdefault((ex.client, ex.connection), []).append(waiting)
            while self._waiting_count > LIVE_LIMIT:
                self._let_go(self._expiry.popleft())
            return found
        chain.hops.append(Hop(len(chain.hops), ex, None, unfollowed_end(ex), 0.0))
        chain.end = chain.hops[-1].link
        return found + self._chain_done(chain)

    def _give_up(self, waiting: _Waiting) -> list[Finding]:
        chain, ex = waiting.chain, waiting.redirect
        if chain is None:
            return []  # followed meanwhile
        waiting.chain = None
        self._unwait(waiting)
        self._off_connection(waiting)
        self._waiting_count -= 1
        last = chain.hops[-1]
        chain.hops[-1] = Hop(last.index, ex, None, unfollowed_end(ex), 0.0)
        chain.end = chain.hops[-1].link
        return self._chain_done(chain)

    def _let_go(self, waiting: _Waiting) -> None:
        """Stop waiting for a redirect's follow-up without judging its chain (LIVE_LIMIT):
        ending it now would call it not followed, which it may yet be."""
        if waiting.chain is None:
            return
        waiting.chain = None
        self._unwait(waiting)
        self._off_connection(waiting)
        self._waiting_count -= 1
        self.trimmed["redirects"] += 1

    def _moved_on(self, ex: Exchange) -> None:
        """A redirect on a connection: the earlier ones waiting on it have been moved on
        from, for good, so they leave its list (which stays short however many wait)."""
        key = (ex.client, ex.connection)
        waiters = self._on_connection.get(key)
        if not waiters:
            return
        me = order_key(ex)
        later = []
        for other in waiters:
            if order_key(other.redirect) < me:
                other.moved_on = True
            else:
                later.append(other)
        if later:
            self._on_connection[key] = later
        else:
            del self._on_connection[key]

    def _off_connection(self, waiting: _Waiting) -> None:
        key = (waiting.redirect.client, waiting.redirect.connection)
        waiters = self._on_connection.get(key)
        if waiters is not None and waiting in waiters:
            waiters.remove(waiting)
            if not waiters:
                del self._on_connection[key]

    def _chain_done(self, chain: Chain) -> list[Finding]:
        return run_detectors([chain], (), self.options.detect, CHAIN_RULES)

    # ---- rules beyond one chain ------------------------------------------------

    def _sight(self, ex: Exchange) -> tuple[bytes, str] | None:
        """Count a temporary redirect's sighting; its pair's key and target (None: not one)."""
        target = ex.location_resolved or ex.location
        if not stale_temporary_redirect.is_temporary(ex) or not target or ex.status is None:
            return None
        key = pair_key(ex.url_norm, target)
        if key in self._stale_reported:
            return key, target
        sightings = self._sightings.pop(key, None)  # and in again: the most recently sighted last
        if sightings is None:
            sightings = Sightings()
            while len(self._sightings) >= LIVE_LIMIT:
                del self._sightings[next(iter(self._sightings))]
                self.trimmed["redirect pairs"] += 1
        self._sightings[key] = sightings
        sightings.count_sighting(ex.status, ex.started_at)  # no exchange kept: a summary
        sightings.note_headers(ex)
        return key, target

    def _sighted(self, chain: Chain, ex: Exchange) -> list[Finding]:
        """A temporary redirect was served (again): is it stale now?"""
        sighted = self._sight(ex)
        if sighted is None or sighted[0] in self._stale_reported:
            return []
        key, target = sighted
        judged = stale_temporary_redirect.judge(
            ex.url_norm, target, self._sightings[key], self.options.detect
        )
        if judged is None:
            return []
        while len(self._stale_reported) >= LIVE_LIMIT:
            del self._stale_reported[next(iter(self._stale_reported))]
        self._stale_reported[key] = None
        del self._sightings[key]
        # Point the finding at this sighting, in the chain it belongs to.
        return [stale_temporary_redirect.stale_finding(*judged, ex, chain, len(chain.hops))]

    def _check_write(self, ex: Exchange, arrival: Arrival | None) -> list[Finding]:
        if not (
            ex.method in duplicate_write.METHOD_SEVERITY
            and duplicate_write.succeeded(ex)
            and ex.request_body.sha256
            and ex.request_body.length
        ):
            return []
        mine = {ex.id: arrival} if arrival is not None and ex.id is not None else {}
        key: WriteKey = (
            ex.client,
            ex.method,
            duplicate_write.logical_target(ex, Context(options=self.options.detect, arrivals=mine)),
            ex.request_body.sha256,
        )
        group = self._writes.get(key)
        window = self.options.detect.duplicate_window
        if group is None or duplicate_write.gap(group.deliveries[0], ex) > window:
            self._writes.pop(key, None)  # and in again, at the end: the groups stay in time order
            while len(self._writes) >= LIVE_LIMIT:
                del self._writes[next(iter(self._writes))]
                self.trimmed["writes"] += 1
            group = self._writes[key] = _WriteGroup()
        group.count += 1
        if group.reported or len(group.deliveries) >= KEPT_DELIVERIES:
            return []
        group.deliveries.append(ex)
        group.arrivals.update(mine)
        if len(group.deliveries) < 2:
            return []
        found = list(
            duplicate_write.check([], Context(self.options.detect, group.deliveries, group.arrivals))
        )
        group.reported = bool(found)
        if found:  # reported once: only its count is kept from now on
            group.deliveries[1:] = []
            group.arrivals.clear()
        return found

    def _forget_old(self, now: float) -> None:
        """Let go of the writes whose duplicate window has passed (it opens a new group)."""
        horizon = now - self.options.detect.duplicate_window - self.window
        while self._writes:
            key = next(iter(self._writes))
            if (self._writes[key].deliveries[0].started_at or 0.0) >= horizon:
                break
            del self._writes[key]
