"""The figures the issues set targets for, and each printed against its target.

A benchmark that measures one of them ends its output with `verdict(KEY, value)`: the
figure, the target and `met` or `MISSED`. `docs/benchmarks.md` ("Against the targets")
keeps the latest value of each, and the README's Performance paragraph quotes that
table; `tests/test_docs.py` holds the three in step (same figures, same targets, the
README's values those of the table).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Target:
    what: str  # the figure, as the table and the README name it
    limit: float
    unit: str
    at_most: bool  # True: the figure must not exceed `limit`; False: reach it
    script: str  # the benchmark that measures it

    def text(self) -> str:
        """`<= 300 MB`, `>= 100,000 entries/s`: as the table and the README write it."""
        return f"{'<=' if self.at_most else '>='} {self.limit:,g} {self.unit}"

    def met(self, value: float) -> bool:
        return value <= self.limit if self.at_most else value >= self.limit


TARGETS = {
    "import-rate": Target(
        "HAR import, 100k browser-like entries", 100_000, "entries/s", False, "bench_fleet.py import"
    ),
    "import-peak": Target("HAR import, largest process", 150, "MB", True, "bench_fleet.py import"),
    # `findings` in every format, `chains`, `clients`, `captures`, on the demo and a 10k store
    "everyday": Target("slowest everyday command", 1, "s", True, "bench_cli.py"),
    "run": Target("`run -- true`, added", 1, "s", True, "bench_session.py"),
    "plugin": Target("pytest plugin, added per session", 1, "s", True, "bench_session.py"),
    "one-client": Target("`analyze` of 10M from one client, peak", 300, "MB", True, "bench_windows.py"),
    "many-clients": Target("`analyze` of 10M over 360k addresses, peak", 300, "MB", True, "bench_windows.py"),
    "append": Target("+1% to one 1M client, of a full run", 5, "%", True, "bench_windows.py --append 0.01"),
    "postgresql": Target("PostgreSQL `analyze` against SQLite, 1M", 1.3, "x", True, "bench_fleet.py analyze"),
}


def verdict(key: str, value: float, note: str = "") -> str:
    """One line: the figure, its target and whether it is met (`note`: what it was
    measured on, when that is not the target's own case)."""
    target = TARGETS[key]
    shown = f"{value:,.0f}" if abs(value) >= 100 else f"{value:.2f}"
    said = f" ({note})" if note else ""
    return (
        f"TARGET {target.what}: {shown} {target.unit}{said}; target {target.text()}: "
        f"{'met' if target.met(value) else 'MISSED'}"
    )
