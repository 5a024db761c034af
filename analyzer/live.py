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
hop it belongs to. What is kept is bounded by the link and duplicate windows.
"""

from __future__ import annotations

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


@dataclass
class _Waiting:
    """A redirect waiting for its follow-up, and the chain it ends for now."""

    redirect: Exchange
    chain: Chain
    moved_on: bool = False  # its connection has carried another redirect of the client since
    urls: tuple[str, ...] = ()  # the follow-up URLs it waits under (chains.follow_up_urls)


@dataclass
class _WriteGroup:
    deliveries: list[Exchange] = field(default_factory=list)
    reported: bool = False


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
        self._arrivals: dict[int, tuple[Chain, int]] = {}
        self._arrival_times: deque[tuple[float, int]] = deque()
        self._writes: dict[WriteKey, _WriteGroup] = {}
        self._write_times: deque[tuple[float, WriteKey]] = deque()
        self._stale_reported: set[tuple[str, str]] = set()
        if isinstance(history, dict):
            self._sightings: dict[tuple[str, str], Sightings] = history
        else:
            self._sightings = {}
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
        if waiting is not None:
            chain = waiting.chain
            source = waiting.redirect
            how, confidence = grade_link(source, ex, ambiguous=False)
            chain.hops[-1] = Hop(len(chain.hops) - 1, source, ex, how, confidence)
            self._arrivals[ex.id] = (chain, len(chain.hops) - 1)
            self._arrival_times.append((ex.started_at or 0.0, ex.id))
        elif ex.is_redirect:
            chain = Chain(hops=[], end=PENDING)
        else:
            chain = None
        if ex.is_redirect and ex.connection is not None:
            me = order_key(ex)
            for other in self._on_connection.get((ex.client, ex.connection), ()):
                if order_key(other.redirect) < me:
                    other.moved_on = True
        if chain is not None:
            if ex.is_redirect:
                found += self._continue(chain, ex)
            else:
                chain.end = "final" if ex.status is not None else "error"
                found += self._chain_done(chain)
        found += self._check_write(ex)
        return found

    def expire(self, now: float | None = None) -> list[Finding]:
        """End the chains whose last redirect was not followed within the window."""
        now = time.time() if now is None else now
        found: list[Finding] = []
        while self._expiry and (self._expiry[0].redirect.started_at or 0.0) + self.window < now:
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
            if ex.connection is not None:
                self._on_connection.setdefault((ex.client, ex.connection), []).append(waiting)
            return found
        chain.hops.append(Hop(len(chain.hops), ex, None, unfollowed_end(ex), 0.0))
        chain.end = chain.hops[-1].link
        return found + self._chain_done(chain)

    def _give_up(self, waiting: _Waiting) -> list[Finding]:
        chain, ex = waiting.chain, waiting.redirect
        last = chain.hops[-1]
        if last.target is not None or last.source is not ex:
            return []  # followed meanwhile
        self._unwait(waiting)
        self._off_connection(waiting)
        chain.hops[-1] = Hop(last.index, ex, None, unfollowed_end(ex), 0.0)
        chain.end = chain.hops[-1].link
        return self._chain_done(chain)

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

    def _sight(self, ex: Exchange) -> tuple[str, str] | None:
        target = ex.location_resolved or ex.location
        if not stale_temporary_redirect.is_temporary(ex) or not target:
            return None
        key = (ex.url_norm, target)
        if key not in self._stale_reported:
            self._sightings.setdefault(key, Sightings()).add(ex)
        return key

    def _sighted(self, chain: Chain, ex: Exchange) -> list[Finding]:
        """A temporary redirect was served (again): is it stale now?"""
        key = self._sight(ex)
        if key is None or key in self._stale_reported:
            return []
        judged = stale_temporary_redirect.judge(*key, self._sightings[key], self.options.detect)
        if judged is None:
            return []
        self._stale_reported.add(key)
        del self._sightings[key]
        # Point the finding at this sighting, in the chain it belongs to.
        return [stale_temporary_redirect.stale_finding(*judged, ex, chain, len(chain.hops))]

    def _check_write(self, ex: Exchange) -> list[Finding]:
        if not (
            ex.method in duplicate_write.METHOD_SEVERITY
            and duplicate_write.succeeded(ex)
            and ex.request_body.sha256
            and ex.request_body.length
        ):
            return []
        context = Context(options=self.options.detect, arrivals=self._arrivals)
        key: WriteKey = (
            ex.client,
            ex.method,
            duplicate_write.logical_target(ex, context),
            ex.request_body.sha256,
        )
        group = self._writes.get(key)
        window = self.options.detect.duplicate_window
        if group is None or duplicate_write.gap(group.deliveries[0], ex) > window:
            group = self._writes[key] = _WriteGroup()
            self._write_times.append((ex.started_at or 0.0, key))
        group.deliveries.append(ex)
        if group.reported or len(group.deliveries) < 2:
            return []
        found = list(
            duplicate_write.check([], Context(self.options.detect, group.deliveries, self._arrivals))
        )
        group.reported = bool(found)
        return found

    def _forget_old(self, now: float) -> None:
        horizon = now - self.options.detect.duplicate_window - self.window
        while self._write_times and self._write_times[0][0] < horizon:
            _, key = self._write_times.popleft()
            group = self._writes.get(key)
            if group is not None and (group.deliveries[-1].started_at or 0.0) < horizon:
                del self._writes[key]
        while self._arrival_times and self._arrival_times[0][0] < horizon:
            _, ex_id = self._arrival_times.popleft()
            self._arrivals.pop(ex_id, None)
