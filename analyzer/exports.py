"""Findings in the formats other tools read: SARIF 2.1.0, JUnit XML, Markdown; and the CI gate.

All of them start from `report.finding_records` (and `chain_records` for JUnit), so
they say the same thing as `findings --format json`.

* SARIF: one run, the rules with their documentation, one result per finding. Each
  result points back to the capture: the HAR file as the artifact with the entry as a
  logical location (`log.entries[12]`), or the flow id for proxy and flow captures; its
  `partialFingerprints` carry the finding's stable fingerprint, so code-scanning
  services track it across runs.
* JUnit: one test case per chain (and per finding that belongs to no chain), failed by
  the findings on it, so a CI dashboard lists the redirect chains that went wrong.
* Markdown: a summary and a table per rule, for a pull-request comment or a ticket.
* Gate: which findings at or above a severity are not in a baseline.
"""

from __future__ import annotations

import html
import json
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict
from pathlib import Path

from analyzer import __version__
from analyzer.detectors import RULES, Rule
from analyzer.errors import ReportedError
from analyzer.files import write_private
from analyzer.model import Severity
from analyzer.report import Record, hop_text
from analyzer.text import counted, printable, xml_safe

SARIF_SCHEMA = "https://docs.oasis-open.org/sarif/sarif/v2.1.0/errata01/os/schemas/sarif-schema-2.1.0.json"
SARIF_LEVEL = {"high": "error", "medium": "warning", "low": "note", "info": "note"}
BASELINE_VERSION = 1


# ---- SARIF ---------------------------------------------------------------------


def sarif(records: list[Record]) -> Record:
    rules = [_sarif_rule(rule) for rule in RULES]
    index = {rule.slug: i for i, rule in enumerate(RULES)}
    artifacts: dict[str, int] = {}
    results = [_sarif_result(r, index, artifacts) for r in records]
    run = {
        "tool": {"driver": {"name": "redirect-audit", "version": __version__, "rules": rules}},
        "artifacts": [{"location": {"uri": uri}} for uri in artifacts],
        "results": results,
        "columnKind": "unicodeCodePoints",
    }
    return {"$schema": SARIF_SCHEMA, "version": "2.1.0", "runs": [run]}


def _sarif_rule(rule: Rule) -> Record:
    return {
        "id": rule.id,
        "name": rule.slug,
        "shortDescription": {"text": rule.summary},
        "fullDescription": {"text": rule.doc.split("\n", 1)[0]},
        "help": {"text": rule.doc},
        "defaultConfiguration": {"level": SARIF_LEVEL[str(rule.severity)]},
        "properties": {"severity": str(rule.severity)},
    }


def _artifact_uri(path: str) -> str:
    return Path(path).resolve().as_uri()


def _sarif_result(r: Record, index: dict[str, int], artifacts: dict[str, int]) -> Record:
    capture = r["capture"]
    location: Record = {}
    if capture.get("file"):
        uri = _artifact_uri(capture["file"])
        artifacts.setdefault(uri, len(artifacts))
        location["physicalLocation"] = {"artifactLocation": {"uri": uri, "index": artifacts[uri]}}
    if capture.get("entry_index") is not None:
        name = f"log.entries[{capture['entry_index']}]"
    else:
        name = f"flow {capture.get('flow_id')}"
    location["logicalLocations"] = [{"name": name, "fullyQualifiedName": name, "kind": "object"}]
    # listed with --show-suppressed: code scanning shows them as suppressed, with the reason
    suppressed = (
        {"suppressions": [{"kind": "external", "status": "accepted", "justification": r["suppressed"]}]}
        if r.get("suppressed")
        else {}
    )
    return {
        **suppressed,
        "ruleId": r["rule_id"],
        "ruleIndex": index[r["rule"]],
        "level": SARIF_LEVEL[r["severity"]],
        "message": {"text": f"{r['message']} ({hop_text(r)})"},
        "locations": [location],
        "partialFingerprints": {"redirectAudit/v1": r["fingerprint"]},
        "properties": {
            "severity": r["severity"],
            "confidence": r["confidence"],
            "chain_id": r["chain_id"],
            "hop": r["hop"],
            "followed": r["followed"],
            "client": r["client"],
            **({"client_name": r["client_name"]} if r.get("client_name") else {}),
            "observed_at": r["observed_at"],
            "evidence": r["evidence"],
            "capture": capture,
            **({"test": r["test"]} if r.get("test") else {}),
        },
    }


# ---- JUnit ---------------------------------------------------------------------


def junit(findings: list[Record], chains: list[Record]) -> str:
    by_chain: dict[int | None, list[Record]] = defaultdict(list)
    for f in findings:
        by_chain[f["chain_id"]].append(f)
    suite = ET.Element("testsuite", name="redirect-audit")
    cases = 0
    for chain in chains:
        first = chain["hops"][0]["from"]
        hops = counted(len(chain["hops"]), "hop")
        name = f"chain {chain['chain_id']}: {first['method']} {first['url']} ({hops}, {chain['end']})"
        _case(suite, chain["client"], name, by_chain.get(chain["chain_id"], []))
        cases += 1
    for f in by_chain.get(None, []):  # findings about requests outside any chain
        _case(suite, f["client"], f"{f['rule']}: {f['method_before']} {f['from_url']}", [f])
        cases += 1
    failures = sum(1 for case in suite if case.find("failure") is not None)
    suite.set("tests", str(cases))
    suite.set("failures", str(failures))
    suite.set("errors", "0")
    root = ET.Element(
        "testsuites", name="redirect-audit", tests=str(cases), failures=str(failures), errors="0"
    )
    root.append(suite)
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"


def _case(suite: ET.Element, client: str, name: str, found: list[Record]) -> None:
    # Whatever a capture holds, the file stays XML: characters XML 1.0 cannot hold are escaped.
    case = ET.SubElement(
        suite, "testcase", classname=xml_safe(f"redirect-audit.{client}"), name=xml_safe(name)
    )
    tests = sorted({f["test"] for f in found if f.get("test")})
    if tests:  # the test(s) during which the chain's findings happened (pytest plugin)
        properties = ET.SubElement(case, "properties")
        for test in tests:
            ET.SubElement(properties, "property", name="test", value=xml_safe(test))
    for f in found:
        failure = ET.SubElement(
            case, "failure", type=f"{f['rule_id']} {f['rule']}", message=xml_safe(f["message"])
        )
        during = f"test: {f['test']}\n" if f.get("test") else ""
        failure.text = xml_safe(
            f"severity {f['severity']}, hop {f['hop']}: {hop_text(f)}\n{during}"
            f"evidence: {json.dumps(f['evidence'], sort_keys=True)}"
        )


# ---- Markdown ------------------------------------------------------------------


def markdown(records: list[Record]) -> str:
    lines = ["# redirect-audit findings", ""]
    if not records:
        return "\n".join([*lines, "No findings.", ""])
    counts = Counter(r["severity"] for r in records)
    summary = ", ".join(f"{counts[s]} {s}" for s in ("high", "medium", "low", "info") if counts[s])
    lines += [f"{counted(len(records), 'finding')}: {summary}.", ""]
    by_rule: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        by_rule[f"{r['rule_id']} `{r['rule']}`"].append(r)
    for title in sorted(by_rule):
        lines += [
            f"## {title}",
            "",
            "| severity | hop | request | follow-up | message |",
            "|---|---|---|---|---|",
        ]
        for r in by_rule[title]:
            follow = hop_text(r).split(" → ", 1)[1]
            lines.append(
                f"| {r['severity']} | {r['chain_id'] or '-'}/{r['hop']} | {_md(r['method_before'])} "
                f"{_md(r['from_url'])} | {_md(follow)} | {_md(r['message'])} |"
            )
        lines.append("")
    return "\n".join(lines)


def _md(text: object) -> str:
    """A table cell: HTML escaped (a renderer would run `<img onerror=...>`), pipes escaped,
    control characters written as escapes."""
    return html.escape(printable(text), quote=False).replace("|", "\\|").replace("`", "\\`")


# ---- the CI gate -------------------------------------------------------------


class BaselineError(ValueError, ReportedError):
    """A baseline file that cannot be used; one line."""


def write_baseline(records: list[Record], path: Path) -> int:
    entries = sorted(
        (
            {
                "fingerprint": r["fingerprint"],
                "rule": r["rule"],
                "severity": r["severity"],
                "from_url": r["from_url"],
                "to_url": r["to_url"],
            }
            for r in records
        ),
        key=lambda e: (e["rule"], e["fingerprint"]),
    )
    unique = list({e["fingerprint"]: e for e in entries}.values())
    write_private(
        path,
        json.dumps({"tool": "redirect-audit", "version": BASELINE_VERSION, "findings": unique}, indent=2)
        + "\n",
    )
    return len(unique)


def read_baseline(path: Path) -> set[str]:
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise BaselineError(f"{path}: cannot read baseline: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise BaselineError(f"{path}: baseline is not JSON: {exc}") from None
    if (
        not isinstance(data, dict)
        or data.get("tool") != "redirect-audit"
        or not isinstance(data.get("findings"), list)
    ):
        raise BaselineError(f"{path}: not a redirect-audit baseline (write one with check --write-baseline)")
    if data.get("version") != BASELINE_VERSION:
        raise BaselineError(f"{path}: baseline version {data.get('version')!r}, expected {BASELINE_VERSION}")
    return {str(e.get("fingerprint")) for e in data["findings"] if isinstance(e, dict)}


def gate(records: list[Record], fail_on: Severity, known: set[str]) -> list[Record]:
    """The findings that fail the gate: at or above `fail_on` and not in the baseline."""
    return [r for r in records if Severity.parse(r["severity"]) >= fail_on and r["fingerprint"] not in known]
