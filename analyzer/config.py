"""The project's configuration: `[tool.redirect-audit]` in pyproject.toml, or redirect-audit.toml.

Found the way ruff finds its own: from the working directory up to the file system's
root, the first directory holding `redirect-audit.toml` or `.redirect-audit.toml` (their
keys at the top level) or a `pyproject.toml` with a `[tool.redirect-audit]` table. One
file is used, never merged; `--config FILE` names one, `--isolated` uses none.

    [tool.redirect-audit]
    select = ["ALL"]                 # rule ids, slugs or id prefixes ("RA1"); default: every rule
    ignore = ["RA114"]
    extend-select = []
    min-confidence = 0.6             # findings less sure than this are suppressed
    ignore-hosts = ["*.doubleclick.net"]   # either end of the redirect on such a host
    third-party = false              # show findings between third parties of a browser page
    fail-on = "medium"               # check, run and the pytest plugin
    stale-after-days = 7             # thresholds of the analysis
    duplicate-window = 600
    max-redirects = 20
    link-window = 30

    [tool.redirect-audit.severity]   # a rule's severity for this project
    RA104 = "low"

    [tool.redirect-audit.per-url-ignores]  # URL glob (either end) -> rules
    "https://login.example.com/*" = ["RA111"]

An unknown key, rule or value is an error naming the file and the line.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from analyzer.errors import ReportedError

TOOL = "redirect-audit"
OWN_FILES = ("redirect-audit.toml", ".redirect-audit.toml")
SEVERITY_NAMES = ("info", "low", "medium", "high")
THRESHOLDS = {
    "stale-after-days": "stale_after_days",
    "duplicate-window": "duplicate_window",
    "max-redirects": "max_redirects",
    "link-window": "link_window",
}
LISTS = ("select", "ignore", "extend-select", "ignore-hosts")
KEYS = frozenset(
    {*LISTS, *THRESHOLDS, "min-confidence", "third-party", "fail-on", "severity", "per-url-ignores"}
)


class ConfigError(ReportedError):
    """A configuration file that cannot be used; one line naming the file and the line."""


@dataclass(frozen=True)
class Settings:
    """What the configuration says; empty when there is none."""

    path: Path | None = None
    select: tuple[str, ...] | None = None  # rule ids; None: every rule
    ignore: tuple[str, ...] = ()
    extend_select: tuple[str, ...] = ()
    min_confidence: float = 0.0
    ignore_hosts: tuple[str, ...] = ()
    per_url_ignores: tuple[tuple[str, tuple[str, ...]], ...] = ()
    severity: dict[str, str] = field(default_factory=dict)  # rule id -> severity name
    third_party: bool = False
    fail_on: str | None = None
    thresholds: dict[str, float] = field(default_factory=dict)  # AnalysisOptions.as_dict() names

    @property
    def shown(self) -> str:
        return str(self.path) if self.path is not None else "no configuration file"


def find_config(start: Path | None = None) -> Path | None:
    """The configuration file that applies in `start` (default: the working directory)."""
    here = (start or Path.cwd()).resolve()
    for directory in (here, *here.parents):
        for name in OWN_FILES:
            if (directory / name).is_file():
                return directory / name
        pyproject = directory / "pyproject.toml"
        if pyproject.is_file() and _has_tool_table(pyproject):
            return pyproject
    return None


def _has_tool_table(path: Path) -> bool:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    return re.search(r"(?m)^\s*\[\s*tool\s*\.\s*[\"']?redirect-audit[\"']?\s*[.\]]", text) is not None


def load_settings(explicit: str | os.PathLike[str] | None = None, isolated: bool = False) -> Settings:
    """The settings of `explicit`, else of the file found from the working directory."""
    if isolated:
        return Settings()
    if explicit is not None:
        path = Path(explicit)
        if not path.is_file():
            raise ConfigError(f"{path}: no such configuration file")
    else:
        found = find_config()
        if found is None:
            return Settings()
        path = found
    return read_settings(path)


def read_settings(path: Path) -> Settings:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    own = path.name in OWN_FILES
    table = data if own else data.get("tool", {}).get(TOOL)
    if table is None:
        return Settings(path=path)
    return _Reader(path, text, "" if own else f"tool.{TOOL}").settings(table)


class _Reader:
    """Checks one table and says where in the file a bad value stands."""

    def __init__(self, path: Path, text: str, prefix: str) -> None:
        self.path, self.lines, self.prefix = path, text.splitlines(), prefix

    def fail(
        self, problem: str, *, key: str | None = None, value: str | None = None, table: str = ""
    ) -> None:
        line = self._line(key, value, table)
        where = f"{self.path}:{line}" if line else str(self.path)
        raise ConfigError(f"{where}: {problem}")

    def _line(self, key: str | None, value: str | None, table: str) -> int | None:
        section = ".".join(p for p in (self.prefix, table) if p)
        start, inside = 0, not section
        header = re.compile(r"^\s*\[\s*([^\]]+?)\s*\]\s*(#.*)?$")
        for number, text in enumerate(self.lines, 1):
            m = header.match(text)
            if m:
                name = m[1].replace('"', "").replace("'", "").replace(" ", "")
                if inside and start:
                    break
                inside = name == section
                start = number if inside else start
                continue
            if not inside:
                continue
            if value is not None and (f'"{value}"' in text or f"'{value}'" in text):
                return number
            if (
                value is None
                and key is not None
                and re.match(rf"""^\s*["']?{re.escape(key)}["']?\s*=""", text)
            ):
                return number
        return start or None

    def settings(self, table: dict[str, Any]) -> Settings:
        for key in table:
            if key not in KEYS:
                near = [k for k in sorted(KEYS) if k.replace("-", "_") == key.replace("-", "_")]
                self.fail(
                    f"unknown key {key!r}"
                    + (f" (did you mean {near[0]!r}?)" if near else "")
                    + f"; known: {', '.join(sorted(KEYS))}",
                    key=key,
                )
        values: dict[str, Any] = {"path": self.path}
        for key in LISTS:
            if key in table:
                items = table[key]
                if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
                    self.fail(f"{key} must be a list of strings", key=key)
        rules = {"select": "select", "ignore": "ignore", "extend-select": "extend_select"}
        for key, attr in rules.items():
            if key in table:
                values[attr] = tuple(self.rule_ids(table[key], key))
        if "ignore-hosts" in table:
            values["ignore_hosts"] = tuple(h.lower() for h in table["ignore-hosts"])
        if "min-confidence" in table:
            value = table["min-confidence"]
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
                self.fail("min-confidence must be a number from 0 to 1", key="min-confidence")
            values["min_confidence"] = float(value)
        if "third-party" in table:
            if not isinstance(table["third-party"], bool):
                self.fail("third-party must be true or false", key="third-party")
            values["third_party"] = table["third-party"]
        if "fail-on" in table:
            if table["fail-on"] not in SEVERITY_NAMES:
                self.fail(f"fail-on must be one of {', '.join(SEVERITY_NAMES)}", key="fail-on")
            values["fail_on"] = table["fail-on"]
        thresholds: dict[str, float] = {}
        for key, name in THRESHOLDS.items():
            if key in table:
                value = table[key]
                if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                    self.fail(f"{key} must be a number above 0", key=key)
                if key == "max-redirects" and (not isinstance(value, int) or value < 1):
                    self.fail("max-redirects must be a whole number, at least 1", key=key)
                thresholds[name] = value
        values["thresholds"] = thresholds
        if "severity" in table:
            severity = table["severity"]
            if not isinstance(severity, dict):
                self.fail("severity must be a table of rule = severity", key="severity")
            chosen: dict[str, str] = {}
            for rule, level in severity.items():
                (rule_id,) = self.rule_ids([rule], "severity", table="severity", exact=True)
                if level not in SEVERITY_NAMES:
                    self.fail(
                        f"severity of {rule} must be one of {', '.join(SEVERITY_NAMES)}",
                        key=rule,
                        table="severity",
                    )
                chosen[rule_id] = level
            values["severity"] = chosen
        if "per-url-ignores" in table:
            ignores = table["per-url-ignores"]
            if not isinstance(ignores, dict):
                self.fail('per-url-ignores must be a table of "URL glob" = [rules]', key="per-url-ignores")
            pairs = []
            for pattern, listed in ignores.items():
                if not isinstance(listed, list) or not all(isinstance(i, str) for i in listed):
                    self.fail(
                        f"per-url-ignores {pattern!r} must be a list of rules",
                        key=pattern,
                        table="per-url-ignores",
                    )
                pairs.append(
                    (pattern, tuple(self.rule_ids(listed, "per-url-ignores", table="per-url-ignores")))
                )
            values["per_url_ignores"] = tuple(pairs)
        return Settings(**values)

    def rule_ids(self, names: Iterable[str], key: str, table: str = "", exact: bool = False) -> list[str]:
        try:
            return resolve_rules(names, exact=exact)
        except UnknownRule as exc:
            self.fail(f"unknown rule {exc.name!r} in {key} ({exc.known})", value=exc.name, table=table)
            raise  # not reached: fail raises


class UnknownRule(ValueError):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name
        self.known = "rules are RA101-RA115 or their names: `redirect-audit rules`"


def resolve_rules(names: Iterable[str], exact: bool = False) -> list[str]:
    """Rule ids for ids, names (slugs), id prefixes ("RA1") and "ALL", in rule order."""
    from analyzer.detectors import RULES

    out: list[str] = []
    for raw in names:
        name = raw.strip()
        if not name:
            continue
        upper = name.upper()
        if upper == "ALL" and not exact:
            matched = [r.id for r in RULES]
        else:
            matched = [r.id for r in RULES if r.id == upper or r.slug == name.lower()]
            if not matched and not exact and re.fullmatch(r"RA\d{1,2}", upper):
                matched = [r.id for r in RULES if r.id.startswith(upper)]
        if not matched:
            raise UnknownRule(name)
        out += [m for m in matched if m not in out]
    return out
