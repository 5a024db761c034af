"""Chains and findings of a batch of clients, rebuilt one time window at a time.

A client's traffic can be larger than memory (one CI runner, one service behind a staging
proxy for a month). But every rule looks a bounded time ahead of what it judges, so the
batch is read in windows of start times, `[lo, hi)`, oldest first, and this module carries
from one window to the next only what a later window can still need:

========================  ==========================================  ==================
what                      why a later window needs it                 held until
========================  ==========================================  ==================
claimed follow-ups        a request linked once is never linked       its start < lo
                          again (chains.link_redirects, `claimed`)
open chains               a hop's follow-up is itself a redirect      the chain ends
                          that a later window links
arrivals                  a write that came by redirect counts        its start < hi
                          under the chain's root URL (RA103)
retry answers             RA115 asks what followed a 401/403 within   the chain ends
                          30 s (detectors.credential_dropped)
write clusters            deliveries within the duplicate window      first + window
                          of the first are one logical write (RA103)  < hi
page chains               a browser page's first-party sites come     its navigation's
                          from its navigation's chain (analyzer.      chain ends
                          party)
findings                  finding ids follow the order (time,         nothing earlier
                          exchange, rule) over the whole batch        can still come
========================  ==========================================  ==================

What the caller loads for window `[lo, hi)` (analysis.WindowLoader does it from the store):
the redirects starting in it, whole; the redirects in `[hi, hi + link window]` that
carry a connection (for the same-connection check); the requests to the URLs its
redirects point at, from `lo` to `hi + link window + LOOKAHEAD`; the follow-ups linked,
whole; and its accepted writes. Every rule's reach is stated next to it: linking
(`LinkOptions.window`, 30 s) and the retry after a challenge (`RETRY_REACH`, 30 s) look
ahead; duplicate writes (`DetectorOptions.duplicate_window`, 600 s) are judged when
their cluster can gain no more deliveries. Stale temporary redirects are judged across
clients from the store (analysis.stale_findings) and are not a window's business.

The results are the same whatever the windows, ids included: one window for the whole
batch is the special case (tests/test_windows.py compares window sizes from one
exchange to the whole store on the corpus and the rule fixtures).
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
from bisect import bisect_right
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from analyzer.chains import Link, LinkOptions, OrderKey, link_redirects, order_key, stored_id, unfollowed_end
from analyzer.detectors import RULES, DetectorOptions, run_detectors
from analyzer.detectors import duplicate_write as duplicate
from analyzer.detectors import stale_temporary_redirect as stale
from analyzer.detectors.base import Context
from analyzer.detectors.credential_dropped import DENIED, RECOVERY_WINDOW
from analyzer.model import Body, Chain, Exchange, Finding, Hop, Severity
from analyzer.party import Parties

CHAIN_RULES = tuple(rule for rule in RULES if rule.slug not in (stale.SLUG, duplicate.SLUG))
RETRY_REACH = RECOVERY_WINDOW  # how far after a follow-up a rule looks for its retry
LOOKAHEAD = RETRY_REACH  # past hi + link window, the requests a window's follow-ups may be retried by
BEFORE_ALL = float("-inf")

Arrival = tuple[Chain, int]  # the chain and hop a follow-up came by


@dataclass
class Flushed:
    """What a window settled: chains that ended (third_party set), and the findings that
    nothing later can precede, in finding-id order."""

    chains: list[Chain] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    # findings handed out before that have changed since: a duplicate write that gained
    # deliveries (its place, and so its id, was already certain; its counts were not)
    revised: list[Finding] = field(default_factory=list)


@dataclass(slots=True)
class _Cluster:
    """Deliveries of one logical write within the duplicate window of the first."""

    members: list[tuple[Exchange, Arrival | None]] = field(default_factory=list)
    finding: Finding | None = None  # once certain to fire: its finding, updated as it grows
    handed_out: bool = False


def finding_order(f: Finding) -> tuple[float, int, int, str]:
    """The order finding ids are given in (analysis): time, exchange, rule."""
    ex = f.exchange
    return (ex.started_at or 0.0, ex.capture_id, ex.seq, f.rule_id)


class ChainStream:
    """One batch's analysis, fed window by window in time order (see the module doc)."""

    def __init__(
        self, link: LinkOptions, detect: DetectorOptions, navigations: Iterable[Exchange] = ()
    ) -> None:
        self.link_options = link
        self.detect = detect
        self.claimed: dict[int, float] = {}  # follow-up id -> its start
        self.open: dict[int, Chain] = {}  # id of a follow-up that is a redirect -> its chain
        self.arrivals: dict[int, Arrival] = {}
        self.answers: dict[int, Exchange] = {}  # follow-up id -> the request that retried it
        self.clusters: dict[duplicate.WriteKey, _Cluster] = {}
        self.certain: dict[int, _Cluster] = {}  # id() of a held finding of an open cluster -> it
        self.revised: list[Finding] = []
        self.ended: list[Chain] = []  # ended, rules not run yet
        self.settled: list[Chain] = []  # rules run, not handed out yet
        self.held: list[tuple[float, int, int, str, int, Finding]] = []  # heap, finding_order
        self.counter = itertools.count()
        self.frontier: tuple[float, float, float] = (BEFORE_ALL, 0, 0)  # everything before it handed out
        # How late a request can still be the retry of a denied follow-up linked so far
        # (RA115 looks RETRY_REACH past a 401/403): what a checkpoint's validity depends on.
        self.denied_until = BEFORE_ALL
        self.dormant: _Dormant | None = None  # one-delivery write clusters of a checkpoint, not decoded
        # Browser pages (analyzer.party): sites known once the navigation's chain has ended.
        self.sites: dict[str, frozenset[str]] = {}
        self.navigation: dict[str, int] = {}  # page client -> id of its navigation, a redirect
        self.parked: dict[str, list[Chain | Finding]] = {}
        for nav in navigations:
            if nav.is_redirect:
                self.navigation[nav.client] = stored_id(nav)
            else:
                self.sites.update(Parties.of_urls({nav.client: [nav.url]}).sites)

    # ---- one window ---------------------------------------------------------------------

    def window(
        self,
        redirects: Sequence[Exchange],
        later: Iterable[Exchange],
        candidates: Sequence[Exchange],
        follow_ups: Callable[[dict[int, Link]], dict[int, Exchange]],
        writes: Callable[[], Sequence[Exchange]],
        hi: float | None,
    ) -> Flushed:
        """One window's analysis, whoever reads its exchanges (the store: analysis.WindowLoader;
        a DataFrame: analyzer.distributed). `redirects`: those starting in the window,
        whole; `later`: the redirects in `[hi, hi + link window]` on a connection (light);
        `candidates`: the requests to their targets, up to the window's reach (light);
        `follow_ups(links)`: the linked requests not among `redirects`, whole; `writes()`:
        the window's accepted writes (headers not needed). The two loaders are called in
        turn, so that what one window holds at a time stays small."""
        links = self.link(redirects, candidates, later)
        # Follow-ups are loaded whole: credentials, Referer and body headers are judged on them.
        self.assemble(redirects, links, follow_ups(links), candidates)
        del redirects, later, links, candidates
        self.add_writes(writes(), hi)
        return self.flush(hi)

    def link(
        self, redirects: Sequence[Exchange], candidates: Sequence[Exchange], later: Iterable[Exchange] = ()
    ) -> dict[int, Link]:
        """Link the window's redirects; the follow-ups taken stay taken for later windows."""
        links = link_redirects(
            redirects, candidates, self.link_options, claimed=self.claimed, later_redirects=later
        )
        start = {stored_id(ex): ex.started_at for ex in candidates}
        for link in links.values():
            self.claimed[link.target_id] = start[link.target_id] or BEFORE_ALL
        return links

    def assemble(
        self,
        redirects: Sequence[Exchange],
        links: dict[int, Link],
        follow_ups: dict[int, Exchange],
        candidates: Sequence[Exchange],
    ) -> None:
        """Extend chains by the window's redirects, in time order. `follow_ups`: the linked
        requests that are not among `redirects`, loaded whole."""
        mine = {stored_id(ex): ex for ex in redirects}
        retries = _RetryIndex(candidates)
        for redirect in sorted(redirects, key=order_key):
            chain = self.open.pop(stored_id(redirect), None)
            if chain is None:
                chain = Chain(hops=[], end="", id=stored_id(redirect))
                source = redirect
            else:
                tail = chain.hops[-1].target
                assert tail is not None  # a chain is open on its last follow-up
                source = tail
            link = links.get(stored_id(redirect))
            if link is None:
                end = unfollowed_end(source)
                chain.hops.append(Hop(len(chain.hops), source, None, end, 0.0))
                self._end(chain, end)
                continue
            target = mine.get(link.target_id) or follow_ups[link.target_id]
            index = len(chain.hops)
            chain.hops.append(Hop(index, source, target, link.how, link.confidence))
            self.arrivals[link.target_id] = (chain, index)
            answer = retries.first_after(target)
            if answer is not None:
                self.answers[link.target_id] = answer
            if target.status in DENIED:
                self.denied_until = max(self.denied_until, _started(target) + RETRY_REACH)
            if target.is_redirect:
                self.open[link.target_id] = chain
            else:
                self._end(chain, "final" if target.status is not None else "error")

    def add_writes(self, writes: Sequence[Exchange], hi: float | None) -> None:
        """The window's accepted writes; clusters that can gain no delivery at or after
        `hi` are judged (None: the last window, all are)."""
        window = self.detect.duplicate_window
        context = Context(options=self.detect, arrivals=self.arrivals)
        for write in sorted(writes, key=order_key):
            arrival = self.arrivals.get(stored_id(write))
            ex = write if arrival is None else arrival[0].hops[arrival[1]].target or write
            key = duplicate.write_key(ex, context)
            if key is None:
                continue
            cluster = self.clusters.get(key)
            if cluster is None and self.dormant is not None:
                woken = self.dormant.take(key)
                if woken is not None:
                    cluster = self.clusters[key] = _Cluster(members=[woken])
            if cluster is not None and duplicate.gap(cluster.members[0][0], ex) > window:
                self._close(cluster)
                cluster = None
            if cluster is None:
                cluster = self.clusters[key] = _Cluster()
            if len(cluster.members) == 1:  # the repeat: the finding points at it, and its hop
                cluster.members.append((ex, arrival))
            else:  # a cluster waits up to the duplicate window: what judging reads, no more
                cluster.members.append(_slim(ex, arrival, key))
        if hi is None:
            for cluster in self.clusters.values():
                self._close(cluster)
            self.clusters.clear()
            self.arrivals.clear()
            self.dormant = None  # one delivery each: nothing to judge
            return
        for key, cluster in list(self.clusters.items()):
            if (cluster.members[0][0].started_at or 0.0) < hi - window:
                self._close(cluster)
                del self.clusters[key]
        self._doze(hi - window)
        self.arrivals = {
            target: arrival
            for target, arrival in self.arrivals.items()
            if _started(arrival[0].hops[arrival[1]].target) >= hi
        }
        self.claimed = {target: start for target, start in self.claimed.items() if start >= hi}

    def _doze(self, since: float) -> None:
        """One-delivery clusters left encoded until a repeat wakes them, as a checkpoint's
        are (_Dormant): at 1,000 exchanges a second a client holds ~75,000 of them for the
        duplicate window, ~1 KB each as objects and ~200 bytes encoded. The encoded ones
        whose window has gone by (`since`) are dropped: one delivery, nothing to judge."""
        single = [key for key, cluster in self.clusters.items() if len(cluster.members) == 1]
        if single and self.dormant is None:
            self.dormant = _Dormant([], [], [])
        for key in single:
            ex, arrival = self.clusters.pop(key).members[0]
            self.dormant.add(  # type: ignore[union-attr]  # made above
                write_key_hash(key),
                _started(ex),
                msgspec.Raw(_ENCODER.encode((key, _slim_fields(ex, arrival)))),
            )
        if self.dormant is not None:
            self.dormant.prune(since)

    def flush(self, hi: float | None) -> Flushed:
        """Run the rules on the chains that ended, and hand out what is settled: every
        ended chain, and the findings before anything a later window can still find
        (everything, with `hi` None: the batch is done)."""
        if self.ended:
            ready, self.ended = self.ended, []
            requests = [
                self.answers.pop(stored_id(h.target))
                for c in ready
                for h in c.hops
                if h.target is not None and h.target.id in self.answers
            ]
            for finding in run_detectors(
                ready,
                (),
                self.detect,
                rules=CHAIN_RULES,
                parties=Parties(self.sites),
                requests=requests,
            ):
                self._hold(finding)
            self.settled += ready
        # A cluster that fires now fires whatever joins it (more deliveries only add keys and
        # answers): its finding takes its place now, so that it holds nothing back.
        for cluster in self.clusters.values():
            if len(cluster.members) > 1 and cluster.finding is None:
                cluster.finding = self._judged(cluster)
                if cluster.finding is not None:
                    self.certain[id(cluster.finding)] = cluster
                    self._place(cluster.finding)
        out = Flushed(chains=self.settled, revised=self.revised)
        self.settled, self.revised = [], []
        if hi is None:
            assert not self.open and not self.parked, "every chain ends in the last window"
            frontier: tuple[float, float, float] = (float("inf"), 0, 0)
        else:
            frontier = min(
                [
                    (hi, BEFORE_ALL, BEFORE_ALL),
                    *(order_key(chain.root) for chain in self.open.values()),
                    *(_key(item) for parked in self.parked.values() for item in parked),
                    *(
                        order_key(c.members[1][0])
                        for c in self.clusters.values()
                        if len(c.members) > 1 and c.finding is None
                    ),
                ]
            )
        self.frontier = frontier
        while self.held and self.held[0][:3] < frontier:
            finding = heapq.heappop(self.held)[-1]
            settled = self.certain.pop(id(finding), None)
            if settled is not None:
                settled.handed_out = True
            out.findings.append(finding)
        return out

    # ---- on the way -----------------------------------------------------------------------

    def _end(self, chain: Chain, end: str) -> None:
        chain.end = end
        client = chain.root.client
        navigation = self.navigation.get(client)
        if navigation is None:
            self.ended.append(chain)
        elif navigation != chain.id:
            self.parked.setdefault(client, []).append(chain)
        else:  # the page's navigation: its sites are known now
            urls = [ex.url for ex in chain.exchanges]
            if chain.hops[-1].target is None:
                urls.append(chain.hops[-1].source.location_resolved or "")
            self.sites.update(Parties.of_urls({client: urls}).sites)
            del self.navigation[client]
            self.ended.append(chain)
            for item in self.parked.pop(client, []):
                if isinstance(item, Chain):
                    self.ended.append(item)
                else:
                    self._hold(item)

    def _judged(self, cluster: _Cluster) -> Finding | None:
        arrivals = {stored_id(ex): arrival for ex, arrival in cluster.members if arrival is not None}
        return duplicate.judge(
            [ex for ex, _ in cluster.members], Context(options=self.detect, arrivals=arrivals)
        )

    def _close(self, cluster: _Cluster) -> None:
        """A cluster that can gain no more deliveries: its finding, final."""
        if len(cluster.members) < 2:
            return
        final = self._judged(cluster)
        placed = cluster.finding
        if placed is None:
            if final is not None:
                self._place(final)
            return
        assert final is not None  # it was certain to fire
        placed.severity, placed.confidence = final.severity, final.confidence
        placed.message, placed.evidence = final.message, final.evidence
        if cluster.handed_out:
            self.revised.append(placed)

    def _place(self, finding: Finding) -> None:
        client = finding.exchange.client
        if client in self.navigation:
            self.parked.setdefault(client, []).append(finding)  # third party or not: not known yet
        else:
            self._hold(finding)

    def _hold(self, finding: Finding) -> None:
        """Keep a finding until nothing can come before it; a duplicate write learns here
        whether it is about third parties (the chain rules learn it in run_detectors)."""
        if finding.rule == duplicate.SLUG and self.sites:
            parties = Parties(self.sites)
            if finding.chain is not None:
                context = Context(parties=parties)
                finding.third_party = context.third_party(finding.chain, finding.chain.hops[finding.hop])
            else:
                finding.third_party = parties.third_party_exchange(finding.exchange)
        heapq.heappush(self.held, (*finding_order(finding), next(self.counter), finding))


# ---- checkpoints: a stream's state between two windows, kept in the store ----------------
#
# A client appended to is analyzed again from the last checkpoint whose state no new
# exchange could have changed (analysis.py, `Snapshot.horizon`): the state is what the
# windows before it left open. Exchanges are kept by id (reloaded whole), chains by their
# hops, findings by their fields; what a slim delivery holds is kept as is.


class Snapshot(msgspec.Struct, array_like=True):
    boundary: float  # the next window starts here
    frontier: tuple[float, float, float]
    claimed: list[tuple[int, float]]
    chains: dict[int, tuple[str, bool | None, list[tuple[int, int | None, str, float]]]]
    open: list[tuple[int, int]]  # waiting follow-up id, chain id
    arrivals: list[tuple[int, int, int]]  # follow-up id, chain id, hop
    answers: list[tuple[int, int]]
    clusters: list[tuple[list[str], bool, int | None, list[tuple[Any, ...]]]]
    held: list[tuple[Any, ...]]  # findings not handed out, in heap order
    handed: list[tuple[Any, ...]]  # handed-out findings of open clusters
    # ChainStream.denied_until; None in a checkpoint stored before it was kept
    denied_until: float | None = None
    # Write clusters of one delivery (most of them: every write waits out the duplicate
    # window in case it is repeated), apart from `clusters` and each encoded on its own, so
    # that taking a checkpoint up decodes only those the new traffic repeats (_Dormant).
    single_keys: list[int] = msgspec.field(default_factory=list)  # write_key_hash of each
    single_starts: list[float] = msgspec.field(default_factory=list)
    singles: list[msgspec.Raw] = msgspec.field(default_factory=list)  # msgpack of (key, slim fields)

    def horizon(self, link: LinkOptions) -> float:
        """The latest start of an exchange that could have changed this state. A window
        `[lo, boundary)` links its redirects to requests within the link window after them
        (and a redirect on a connection up to `boundary` + link window, inclusive, decides
        a same-connection link); its denied follow-ups look RETRY_REACH further for the
        retry that answers them (RA115). Nothing else a window decides reads later traffic.
        A new exchange starting after the horizon leaves the state as it is."""
        if self.denied_until is None:  # not known: as far as any window reads
            return self.boundary + link.window + LOOKAHEAD
        return max(self.boundary + link.window, self.denied_until)


def _finding_state(f: Finding) -> tuple[Any, ...]:
    return (
        f.rule,
        f.rule_id,
        int(f.severity),
        f.confidence,
        f.message,
        f.chain.id if f.chain else None,
        f.hop,
        f.evidence,
        stored_id(f.exchange),
        f.third_party,
    )


def snapshot(stream: ChainStream, boundary: float) -> bytes:
    """The stream's state after the window that ends at `boundary` (flushed, no pages)."""
    assert not stream.ended and not stream.settled and not stream.navigation and not stream.parked
    chains: dict[int, Chain] = {}

    def chain_id(chain: Chain) -> int:
        chains[stored_id(chain.root)] = chain
        return stored_id(chain.root)

    clusters = []
    in_order = sorted(stream.held, key=lambda entry: entry[:5])  # ties keep the order they came in
    held_at = {id(entry[-1]): i for i, entry in enumerate(in_order)}
    handed: list[tuple[Any, ...]] = []
    single_keys, single_starts, singles = (
        stream.dormant.alive(boundary - stream.detect.duplicate_window) if stream.dormant else ([], [], [])
    )
    for key, cluster in stream.clusters.items():
        if len(cluster.members) == 1:
            ex, arrival = cluster.members[0]
            single_keys.append(write_key_hash(key))
            single_starts.append(_started(ex))
            singles.append(msgspec.Raw(_ENCODER.encode((key, _slim_fields(ex, arrival)))))
            continue
        members = []
        for i, (ex, arrival) in enumerate(cluster.members):
            if i == 1:
                members.append(
                    ("whole", stored_id(ex), *((chain_id(arrival[0]), arrival[1]) if arrival else ()))
                )
            else:
                members.append(("slim", *_slim_fields(ex, arrival)))
        placed = None
        if cluster.finding is not None:
            if cluster.handed_out:
                placed = -1 - len(handed)
                handed.append(_finding_state(cluster.finding))
                if cluster.finding.chain:
                    chain_id(cluster.finding.chain)
            else:
                placed = held_at[id(cluster.finding)]
        clusters.append((list(key), cluster.handed_out, placed, members))
    held = []
    for *_, finding in in_order:
        if finding.chain:
            chain_id(finding.chain)
        held.append(_finding_state(finding))
    for chain in stream.open.values():
        chain_id(chain)
    arrivals = [(target, chain_id(chain), hop) for target, (chain, hop) in stream.arrivals.items()]
    return msgspec.msgpack.encode(
        Snapshot(
            boundary=boundary,
            frontier=stream.frontier,
            claimed=list(stream.claimed.items()),
            chains={
                cid: (
                    chain.end,
                    chain.third_party,
                    [
                        (stored_id(h.source), h.target.id if h.target else None, h.link, h.confidence)
                        for h in chain.hops
                    ],
                )
                for cid, chain in chains.items()
            },
            open=[(waiting, stored_id(chain.root)) for waiting, chain in stream.open.items()],
            arrivals=arrivals,
            answers=[(target, stored_id(answer)) for target, answer in stream.answers.items()],
            clusters=clusters,
            held=held,
            handed=handed,
            denied_until=stream.denied_until,
            single_keys=single_keys,
            single_starts=single_starts,
            singles=singles,
        )
    )


def read_snapshot(data: bytes) -> Snapshot:
    return msgspec.msgpack.decode(data, type=Snapshot)


def resume(
    link: LinkOptions,
    detect: DetectorOptions,
    state: Snapshot,
    load: Callable[[list[int]], dict[int, Exchange]],
) -> ChainStream:
    """A stream as `snapshot` left it; `load` gives exchanges, whole, by id."""
    stream = ChainStream(link, detect)
    wanted = {src for _, _, hops in state.chains.values() for src, _, _, _ in hops}
    wanted |= {tgt for _, _, hops in state.chains.values() for _, tgt, _, _ in hops if tgt is not None}
    wanted |= {answer for _, answer in state.answers}
    wanted |= {f[8] for f in (*state.held, *state.handed)}
    wanted |= {m[1] for *_, members in state.clusters for m in members if m[0] == "whole"}
    by_id = load(sorted(wanted))
    chains: dict[int, Chain] = {}
    for cid, (end, third, hops) in state.chains.items():
        chain = Chain(hops=[], end=end, id=cid, third_party=third)
        for src, tgt, how, confidence in hops:
            chain.hops.append(
                Hop(len(chain.hops), by_id[src], by_id[tgt] if tgt is not None else None, how, confidence)
            )
        chains[cid] = chain

    def finding(f: tuple[Any, ...]) -> Finding:
        rule, rule_id, severity, confidence, message, cid, hop, evidence, ex, third = f
        return Finding(
            rule=rule,
            rule_id=rule_id,
            severity=Severity(severity),
            confidence=confidence,
            message=message,
            chain=chains[cid] if cid is not None else None,
            hop=hop,
            evidence=evidence,
            exchange=by_id[ex],
            third_party=third,
        )

    stream.frontier = state.frontier
    stream.denied_until = state.horizon(link) if state.denied_until is None else state.denied_until
    stream.claimed = dict(state.claimed)
    stream.open = {waiting: chains[cid] for waiting, cid in state.open}
    stream.arrivals = {target: (chains[cid], hop) for target, cid, hop in state.arrivals}
    stream.answers = {target: by_id[answer] for target, answer in state.answers}
    held = [finding(f) for f in state.held]
    for f in held:
        stream._hold(f)
    handed = [finding(f) for f in state.handed]
    for key, handed_out, placed, members in state.clusters:
        cluster = _Cluster(handed_out=handed_out)
        for m in members:
            if m[0] == "whole":
                arrival = (chains[m[2]], m[3]) if len(m) > 2 else None
                cluster.members.append((by_id[m[1]], arrival))
                continue
            cluster.members.append(_from_slim_fields(m[1:], key))
        if placed is not None:
            cluster.finding = handed[-1 - placed] if placed < 0 else held[placed]
            if not handed_out:
                stream.certain[id(cluster.finding)] = cluster
        stream.clusters[(key[0], key[1], key[2], key[3])] = cluster
    if state.singles:
        stream.dormant = _Dormant(state.single_keys, state.single_starts, state.singles)
    return stream


_ENCODER = msgspec.msgpack.Encoder()
_SINGLE = msgspec.msgpack.Decoder(tuple[tuple[str, str, str, str], tuple[Any, ...]])


def write_key_hash(key: duplicate.WriteKey) -> int:
    """A stable 64-bit hash of a write cluster's key (Python's hash() changes per process)."""
    digest = hashlib.blake2b("\x00".join(key).encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


DORMANT_PRUNE_AT = 4096  # encoded one-delivery clusters held before the first prune


class _Dormant:
    """The one-delivery write clusters of a checkpoint taken up, left encoded: a write of
    the new traffic with the same key wakes its cluster (ChainStream.add_writes); the rest
    pass, unread, to the next checkpoint until the duplicate window has gone by them."""

    def __init__(self, keys: list[int], starts: list[float], raws: list[msgspec.Raw]) -> None:
        self._hold(keys, starts, raws)

    def _hold(self, keys: list[int], starts: list[float], raws: list[msgspec.Raw]) -> None:
        self.keys, self.starts, self.raws = keys, starts, raws
        self.by_hash: dict[int, list[int]] = {}
        for i, h in enumerate(keys):
            self.by_hash.setdefault(h, []).append(i)
        self.woken: set[int] = set()
        self.kept = len(keys)  # how many the last prune kept

    def add(self, key_hash: int, start: float, raw: msgspec.Raw) -> None:
        self.by_hash.setdefault(key_hash, []).append(len(self.keys))
        self.keys.append(key_hash)
        self.starts.append(start)
        self.raws.append(raw)

    def prune(self, since: float) -> None:
        """Drop the woken and those whose duplicate window has gone by at `since`, once
        the lists have doubled since the last prune (a pass over them costs as much as
        rebuilding them: each window would pay it)."""
        if len(self.keys) < max(2 * self.kept, DORMANT_PRUNE_AT):
            return
        self._hold(*self.alive(since))

    def take(self, key: duplicate.WriteKey) -> tuple[Exchange, Arrival | None] | None:
        for i in self.by_hash.get(write_key_hash(key), ()):
            if i in self.woken:
                continue
            stored, fields = _SINGLE.decode(self.raws[i])
            if stored == key:
                self.woken.add(i)
                return _from_slim_fields(fields, key)
        return None

    def alive(self, since: float) -> tuple[list[int], list[float], list[msgspec.Raw]]:
        """Those not woken whose duplicate window has not gone by at `since`: what the
        windows would still hold (add_writes drops a cluster whose first delivery starts
        before hi - window)."""
        kept = [i for i, start in enumerate(self.starts) if start >= since and i not in self.woken]
        return [self.keys[i] for i in kept], [self.starts[i] for i in kept], [self.raws[i] for i in kept]


def _slim(ex: Exchange, arrival: Arrival | None, key: duplicate.WriteKey) -> tuple[Exchange, Arrival | None]:
    """A delivery as a duplicate-write cluster keeps it when it is not the repeat: without
    headers or kept bodies, and instead of the chain it came by, only its root's URL (the
    write's logical target). A month of writes from one client waits in clusters for up to
    the duplicate window each; the whole follow-up and its chain would hold them all."""
    return _from_slim_fields(_slim_fields(ex, arrival), key)


def _slim_fields(ex: Exchange, arrival: Arrival | None) -> tuple[Any, ...]:
    """What a slim delivery holds (a snapshot stores it so): the rest is its cluster's key."""
    root = arrival[0].root if arrival else None
    return (
        stored_id(ex),
        ex.capture_id,
        ex.seq,
        ex.started_at,
        ex.status,
        ex.idempotency_key,
        ex.request_body.length,
        ex.response_body.sha256,
        ex.url_norm,
        *((root.url_norm, root.capture_id, root.seq) if root else ()),
    )


def _from_slim_fields(
    fields: Sequence[Any], key: duplicate.WriteKey | list[str]
) -> tuple[Exchange, Arrival | None]:
    ex_id, capture, seq, started, status, idem, length, answer_sha, url, *root = fields
    client, method, _, sha = key  # the cluster's key holds these strings already
    ex = Exchange(
        id=ex_id,
        capture_id=capture,
        seq=seq,
        client=client,
        method=method,
        url=url,
        url_norm=url,
        started_at=started,
        status=status,
        idempotency_key=idem,
        request_body=Body(length=length, sha256=sha),
        response_body=Body(sha256=answer_sha),
    )
    if not root:
        return ex, None
    stub = Exchange(capture_id=root[1], seq=root[2], method="", url=root[0], url_norm=root[0])
    return ex, (Chain(hops=[Hop(0, stub, None, "", 0.0)], end=""), 0)


def _started(ex: Exchange | None) -> float:
    return BEFORE_ALL if ex is None or ex.started_at is None else ex.started_at


def _key(item: Chain | Finding) -> OrderKey:
    return order_key(item.root if isinstance(item, Chain) else item.exchange)


class _RetryIndex:
    """The window's requests by (client, URL), to find the first one after a follow-up
    within RETRY_REACH: what detectors.base.Context.retry_of finds in the whole batch."""

    def __init__(self, requests: Sequence[Exchange]) -> None:
        groups: dict[tuple[str, str], list[Exchange]] = {}
        for ex in requests:
            if ex.started_at is not None:
                groups.setdefault((ex.client, ex.url_norm), []).append(ex)
        self.by_url = {key: sorted(items, key=order_key) for key, items in groups.items()}
        self.starts = {key: [ex.started_at or 0.0 for ex in items] for key, items in self.by_url.items()}

    def first_after(self, ex: Exchange) -> Exchange | None:
        key = (ex.client, ex.url_norm)
        items = self.by_url.get(key)
        if items is None or ex.started_at is None:
            return None
        i = bisect_right(self.starts[key], ex.started_at)
        if i < len(items) and (items[i].started_at or 0.0) - ex.started_at <= RETRY_REACH:
            return items[i]
        return None


__all__ = ["CHAIN_RULES", "LOOKAHEAD", "ChainStream", "Flushed", "finding_order"]
