"""How fast the command line answers: `--help`, a usage mistake, `findings` on the demo store.

    uv run python benchmarks/bench_cli.py [--runs 15] [--command PATH]

Each case runs as a fresh process, as a user types it, `--runs` times; the script prints
the median and the spread (min-max) in seconds. `findings` reads a demo store built once
in a temporary directory and analyzed, so it measures answering from current results;
"findings, stale" adds one import first, so the store is analyzed again on its own.
`--command` times another build of the tool (say an older checkout's
.venv/bin/redirect-audit) against the same store.

Targets (issue 16): `--help` and a usage error <= 0.3 s, `findings` on the demo <= 0.6 s;
(issue 31) every everyday command (`findings` in every format, `chains`, `clients`,
`captures`) <= 1 s. "findings -f html, figures kept" reads the figures an earlier report
kept in the store; "figures drawn" is the first report on new results.
"""

from __future__ import annotations

import argparse
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from targets import verdict  # noqa: E402

FIXTURE = ROOT / "tests" / "fixtures" / "rules" / "md-307-post-to-get.har"


def timed(command: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    subprocess.run(command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--command", default=str(Path(sys.executable).parent / "redirect-audit"))
    parser.add_argument(
        "--exchanges",
        type=int,
        default=10_000,
        help="then the everyday commands on a store this big (0: not)",
    )
    args = parser.parse_args()
    tool = [args.command]
    work = Path(tempfile.mkdtemp(prefix="bench-cli-"))
    try:
        demo = work / "demo.db"
        subprocess.run(
            [str(Path(sys.executable).parent / "redirect-audit"), "demo", "--db", str(demo)],
            cwd=work,
            stdout=subprocess.DEVNULL,
            check=True,
        )
        subprocess.run(
            [*tool, "findings", "--db", str(demo)], cwd=work, stdout=subprocess.DEVNULL, check=False
        )
        cases = {
            "--help": [*tool, "--help"],
            "usage error (findings --formt json)": [*tool, "findings", "--formt", "json"],
            "findings on the demo store": [*tool, "findings", "--db", str(demo)],
            # the figures were drawn by the first run below and are read back after it
            "findings -f html, figures kept": [
                *tool,
                "findings",
                "--db",
                str(demo),
                "-f",
                "html",
                "-o",
                "r.html",
            ],
            "chains": [*tool, "chains", "--db", str(demo)],
            "clients": [*tool, "clients", "--db", str(demo)],
            "captures": [*tool, "captures", "--db", str(demo)],
        }
        print(f"{args.command}, {args.runs} runs each, seconds: median (min-max)")
        medians: dict[str, float] = {}  # the everyday commands': the slowest is held to its target
        for name, command in cases.items():
            times = [timed(command, work) for _ in range(args.runs)]
            print(f"  {name:40} {statistics.median(times):.3f} ({min(times):.3f}-{max(times):.3f})")
            if name not in ("--help", "usage error (findings --formt json)"):
                medians[f"{name} (demo)"] = statistics.median(times)
        drawn = []
        for i in range(min(args.runs, 5)):  # a copy whose figures are not kept yet: drawn
            copy = work / f"fresh-{i}.db"
            shutil.copy(demo, copy)
            with sqlite3.connect(copy) as conn:
                conn.execute("DELETE FROM meta WHERE key = 'report_figures'")
            drawn.append(timed([*tool, "findings", "--db", str(copy), "-f", "html", "-o", "r.html"], work))
        print(
            f"  {'findings -f html, figures drawn':40} {statistics.median(drawn):.3f} "
            f"({min(drawn):.3f}-{max(drawn):.3f})"
        )
        stale = []
        for i in range(min(args.runs, 5)):
            copy = work / f"stale-{i}.db"
            shutil.copy(demo, copy)
            subprocess.run(
                [
                    str(Path(sys.executable).parent / "redirect-audit"),
                    "import-har",
                    "--db",
                    str(copy),
                    str(FIXTURE),
                ],
                cwd=work,
                stdout=subprocess.DEVNULL,
                check=True,
            )
            stale.append(timed([*tool, "findings", "--db", str(copy)], work))
        print(
            f"  {'findings, stale (analyzes first)':40} {statistics.median(stale):.3f} "
            f"({min(stale):.3f}-{max(stale):.3f})"
        )
        if args.exchanges:
            medians |= everyday(tool, work, args)
        slowest = max(medians, key=lambda name: medians[name])
        print(verdict("everyday", medians[slowest], f"the slowest: {slowest}"))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def everyday(tool: list[str], work: Path, args: argparse.Namespace) -> dict[str, float]:
    """Every format of `findings`, `chains`, `clients`, `captures` on bench_fleet's
    browser-like rows (100 clients), analyzed once; the HTML report's figures kept by a
    first report."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    sys.path.insert(0, str(ROOT / "tests"))
    import bench_fleet

    db = work / "fleet.db"
    bench_fleet.fill(str(db), args.exchanges, 100)
    subprocess.run([*tool, "analyze", "--db", str(db)], cwd=work, stdout=subprocess.DEVNULL, check=True)
    subprocess.run([*tool, "findings", "--db", str(db), "-f", "html", "-o", "r.html"], cwd=work, check=True)
    cases = {
        f"findings -f {fmt}": [*tool, "findings", "--db", str(db), "-f", fmt, "-o", "out"]
        for fmt in ("table", "json", "jsonl", "sarif", "junit", "markdown", "html")
    }
    cases |= {name: [*tool, name, "--db", str(db)] for name in ("chains", "clients", "captures")}
    print(f"{args.exchanges:,} browser-like exchanges over 100 clients, {args.runs} runs each, seconds:")
    medians = {}
    for name, command in cases.items():
        times = [timed(command, work) for _ in range(args.runs)]
        print(f"  {name:40} {statistics.median(times):.3f} ({min(times):.3f}-{max(times):.3f})")
        medians[f"{name} ({args.exchanges:,} exchanges)"] = statistics.median(times)
    return medians


if __name__ == "__main__":
    main()
