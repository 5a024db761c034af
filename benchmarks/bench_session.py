"""What `redirect-audit run` and the pytest plugin cost a test run.

    uv run python benchmarks/bench_session.py [--runs 10] [--suite-runs 3] [--tests 200]

* run: wall time of `redirect-audit run --allow-empty -- true` against `true` alone (the
  store made, the command started while the recorder boots, the recorder stopped where
  it stands since nothing connected, the summary); median of --runs after a first run
  that makes mitmproxy's CA (timed apart); the target (issue 27) is at most 1 s added.
* plugin: a generated suite of --tests tests, each sending one request to a loopback
  upstream (a quarter of them through a redirect), run by pytest in a subprocess
  without the plugin, with `--redirect-audit`, and with `--redirect-audit-fail-on=high`
  too (a flush and an analysis after every test); the tool runs as the plugin's child
  either way, as it does from a test environment that has only the light plugin; median
  wall time of --suite-runs; the target (issue 27) is at most 5% added to the suite's wall time.
* a real suite: httpx 0.28.1's own client tests (tests/thirdparty/httpx, the selection
  tests/test_thirdparty_suites.py runs), without the plugin and with `--redirect-audit`,
  interleaved, median of --suite-runs; the same target.

Loopback only; mitmproxy's CA in a temporary directory.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from targets import verdict  # noqa: E402
from upstream import Upstream  # noqa: E402

SUITE = """
import os
import requests

UP = os.environ["UPSTREAM"]
SESSION = requests.Session()


def make(i):
    def test():
        path = f"/r/302/case{{i}}" if i % 4 == 0 else f"/echo/case{{i}}"
        assert SESSION.get(UP + path, timeout=30).status_code == 200
    return test


for i in range({n}):
    globals()[f"test_{{i:03d}}"] = make(i)
"""


def timed(argv: list[str], env: dict, cwd: Path) -> float:
    start = time.perf_counter()
    done = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=900)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{argv} failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--suite-runs", type=int, default=3)
    parser.add_argument("--tests", type=int, default=200)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-session-"))
    env = {**os.environ, "REDIRECT_AUDIT_CONFDIR": str(work / "conf"), "NO_COLOR": "1"}
    entry = [sys.executable, "-m", "analyzer"]
    first = timed([*entry, "run", "--allow-empty", "--", "true"], env, work)  # makes mitmproxy's CA
    print(f"run -- true, the first (mitmproxy makes its CA, then the command starts): {first:.2f} s")
    bare = [timed(["true"], env, work) for _ in range(args.runs)]
    wrapped = [timed([*entry, "run", "--allow-empty", "--", "true"], env, work) for _ in range(args.runs)]
    print(
        f"run -- true: median {statistics.median(wrapped):.2f} s (min {min(wrapped):.2f}, max {max(wrapped):.2f}); "
        f"true alone {statistics.median(bare) * 1000:.1f} ms; added {statistics.median(wrapped) - statistics.median(bare):.2f} s "
        f"over {args.runs} runs (target: at most 1 s added)"
    )
    run_added = statistics.median(wrapped) - statistics.median(bare)
    upstream = Upstream()
    try:
        suite = work / "suite"
        suite.mkdir()
        (suite / "test_bench.py").write_text(SUITE.format(n=args.tests))
        env["UPSTREAM"] = upstream.origin
        pytest_argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_bench.py"]
        variants = {
            "without the plugin": [],
            "--redirect-audit": ["--redirect-audit=" + str(work / "a.db")],
            "--redirect-audit --redirect-audit-fail-on=high": [
                "--redirect-audit=" + str(work / "b.db"),
                "--redirect-audit-fail-on=high",
            ],
        }
        added = compare(variants, pytest_argv, env, suite, args.suite_runs, [work / "a.db", work / "b.db"],
                        f"{args.tests} tests", per_test=args.tests)  # fmt: skip
    finally:
        upstream.close()
    real_suite(env, work, args.suite_runs)
    print(verdict("run", run_added))
    print(verdict("plugin", added["--redirect-audit"], f"on {args.tests} one-request tests"))


def real_suite(env: dict, work: Path, runs: int) -> None:
    from test_thirdparty_suites import SELECTION, SUITE

    argv = [sys.executable, "-m", "pytest", "-c", "pytest.ini", "-q", "-p", "no:cacheprovider", *SELECTION]
    variants = {
        "without the plugin": ["-p", "no:redirect_audit"],
        "--redirect-audit": [f"--redirect-audit={work / 'h.db'}"],
    }
    compare(variants, argv, env, SUITE, runs, [work / "h.db"], "httpx's own client tests")


def compare(
    variants: dict[str, list[str]],
    argv: list[str],
    env: dict,
    cwd: Path,
    runs: int,
    stores: list[Path],
    what: str,
    per_test: int = 0,
) -> dict[str, float]:
    """Time `argv` plus each variant's arguments, interleaved (so that drift hits every variant
    alike) with fresh stores each time; print each median against the first variant's, and
    return what each added (seconds)."""
    results: dict[str, list[float]] = {}
    for _ in range(runs):
        for name, extra in variants.items():
            for store in stores:
                store.unlink(missing_ok=True)
            results.setdefault(name, []).append(timed([*argv, *extra], env, cwd))
    base = statistics.median(next(iter(results.values())))
    for name, times in results.items():
        median = statistics.median(times)
        each = f", {(median - base) / per_test * 1000:.1f} ms per test" if per_test else ""
        print(
            f"{what}, {name}: median {median:.2f} s (min {min(times):.2f}, max {max(times):.2f}); "
            f"+{median - base:.2f} s ({(median - base) / base:+.0%}; target at most +5%){each}"
        )
    return {name: statistics.median(times) - base for name, times in results.items()}


if __name__ == "__main__":
    main()
