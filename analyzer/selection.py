"""Which findings a team sees: rule selection, suppression and per-rule severity.

Every finding stays in the store. A `Selection` (the configuration file's settings with the
command line's options over them) decides, finding by finding, whether it is shown or
suppressed and why; a suppressed finding is counted and can be listed
(`--show-suppressed`), never silently dropped. Reasons, in the order they are checked:

* its rule is not selected (`select`, `extend-select`) or is ignored (`ignore`);
* it is about a redirect between third parties of a browser page (`third-party = false`,
  the default; analyzer.party);
* either end of its redirect is on an ignored host (`ignore-hosts`, globs);
* either end matches a URL glob whose rules include it (`per-url-ignores`);
* the test that provoked it expected or ignored it (the pytest plugin's marker);
* its confidence is below `min-confidence`.

A rule's severity for the project (`[severity]`) replaces the rule's own before the
severity floor, the gate and the baseline look at it; the record keeps the rule's own as
`rule_severity`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any

from analyzer.config import Settings, resolve_rules
from analyzer.text import counted
from analyzer.urls import endpoint

Record = dict[str, Any]

# Kinds of reasons, for the summary line
RULE, THIRD_PARTY, HOST, URL, TEST, CONFIDENCE = "rule", "third-party", "host", "url", "test", "confidence"


@dataclass(frozen=True)
class Selection:
    rules: frozenset[str] | None = None  # selected rule ids; None: every rule
    severity: dict[str, str] = field(default_factory=dict)
    min_confidence: float = 0.0
    ignore_hosts: tuple[str, ...] = ()
    per_url_ignores: tuple[tuple[str, tuple[str, ...]], ...] = ()
    third_party: bool = False  # show findings between third parties
    source: str = "no configuration file"
    test_ignores: tuple[str, ...] = ()  # rule ids a test marked as ignored

    @classmethod
    def build(
        cls,
        settings: Settings | None = None,
        *,
        select: Sequence[str] | None = None,
        ignore: Sequence[str] = (),
        extend_select: Sequence[str] = (),
        min_confidence: float | None = None,
        third_party: bool | None = None,
    ) -> Selection:
        """The configuration's settings, with the command line's over them (`--select`
        replaces the file's select, `--ignore` and `--extend-select` add to its lists)."""
        settings = settings or Settings()
        chosen = resolve_rules(select) if select else settings.select
        extra = [*settings.extend_select, *resolve_rules(extend_select)]
        ignored = {*settings.ignore, *resolve_rules(ignore)}
        rules = None
        if chosen is not None or extra or ignored:
            from analyzer.detectors import RULES

            base = set(chosen) if chosen is not None else {r.id for r in RULES}
            rules = frozenset((base | set(extra)) - ignored)
        return cls(
            rules=rules,
            severity=dict(settings.severity),
            min_confidence=settings.min_confidence if min_confidence is None else min_confidence,
            ignore_hosts=settings.ignore_hosts,
            per_url_ignores=settings.per_url_ignores,
            third_party=settings.third_party if third_party is None else third_party,
            source=settings.path.name if settings.path is not None else "the command line",
        )

    def why_suppressed(self, r: Record) -> tuple[str, str] | None:
        """(kind, reason) when this finding is suppressed; None when it is shown."""
        rule = r["rule_id"]
        if self.rules is not None and rule not in self.rules:
            return RULE, f"rule {rule} is not selected ({self.source})"
        if r.get("third_party") and not self.third_party:
            return THIRD_PARTY, "a redirect between third parties of the page (--third-party shows it)"
        ends = [u for u in (r.get("from_url"), r.get("to_url")) if u]
        for pattern in self.ignore_hosts:
            for url in ends:
                host = endpoint(url)[1]
                if fnmatchcase(host, pattern):
                    return HOST, f"host {host} matches ignore-hosts {pattern!r} ({self.source})"
        for pattern, rules in self.per_url_ignores:
            if rule in rules and any(fnmatchcase(url, pattern) for url in ends):
                return URL, f"URL matches per-url-ignores {pattern!r} for {rule} ({self.source})"
        if rule in self.test_ignores:
            return TEST, f"the test ignores {rule} (@pytest.mark.redirect_audit)"
        if r["confidence"] < self.min_confidence:
            return (
                CONFIDENCE,
                f"confidence {r['confidence']:.2f} below min-confidence {self.min_confidence:g}",
            )
        return None

    def apply(self, records: Iterable[Record]) -> tuple[list[Record], list[Record]]:
        """(shown, suppressed): each record with the project's severity, and a `suppressed`
        reason (None when shown)."""
        shown: list[Record] = []
        hidden: list[Record] = []
        for r in records:
            r = self.with_severity(r)
            why = self.why_suppressed(r)
            r["suppressed"] = None if why is None else why[1]
            r["suppressed_kind"] = None if why is None else why[0]
            (shown if why is None else hidden).append(r)
        return shown, hidden

    def with_severity(self, r: Record) -> Record:
        r = dict(r)
        r.setdefault("rule_severity", r["severity"])
        level = self.severity.get(r["rule_id"])
        if level is not None:
            r["severity"] = level
        return r


def only(
    records: Iterable[Record],
    *,
    rules: Sequence[str] = (),
    hosts: Sequence[str] = (),
    clients: Sequence[str] = (),
    captures: Sequence[int] = (),
) -> list[Record]:
    """The records a query asks for (`--rule`, `--host`, `--client`, `--capture`): a view,
    not a suppression. Hosts are globs matched against either end of the redirect;
    clients match the id or its label."""
    wanted_rules = set(resolve_rules(rules)) if rules else None
    out = []
    for r in records:
        if wanted_rules is not None and r["rule_id"] not in wanted_rules:
            continue
        if hosts:
            ends = [endpoint(u)[1] for u in (r.get("from_url"), r.get("to_url")) if u]
            if not any(fnmatchcase(h, p.lower()) for h in ends for p in hosts):
                continue
        if clients and not any(c in (r.get("client"), r.get("client_name")) for c in clients):
            continue
        if captures and r.get("capture_id") not in captures:
            continue
        out.append(r)
    return out


def suppressed_summary(hidden: Sequence[Record]) -> str:
    """One line: how many were suppressed and why ("" when none)."""
    if not hidden:
        return ""
    kinds = Counter(r["suppressed_kind"] for r in hidden)
    words = {
        THIRD_PARTY: "third-party (--third-party to show)",
        RULE: "of rules not selected",
        HOST: "on ignored hosts",
        URL: "on per-url-ignores",
        TEST: "ignored by their test",
        CONFIDENCE: "below min-confidence",
    }
    order = list(words)
    ranked = sorted(kinds.items(), key=lambda kn: (-kn[1], order.index(kn[0])))
    parts = ", ".join(f"{n} {words[k]}" for k, n in ranked)
    return f"{counted(len(hidden), 'finding')} suppressed: {parts}; --show-suppressed lists them"


SORTS = ("time", "severity", "rule", "confidence", "client")


def sort_records(records: list[Record], by: str) -> list[Record]:
    from analyzer.model import Severity

    if by == "severity":
        return sorted(records, key=lambda r: -int(Severity.parse(r["severity"])))
    if by == "rule":
        return sorted(records, key=lambda r: r["rule_id"])
    if by == "confidence":
        return sorted(records, key=lambda r: -r["confidence"])
    if by == "client":
        return sorted(records, key=lambda r: r.get("client") or "")
    return records  # time: the store's order
