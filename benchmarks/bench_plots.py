"""How long each figure takes to draw on a large synthetic capture: one 20,000-hop chain
(a redirect loop a client followed far past any limit) among 5,000 short chains, the hops
spread over 200 origins and 40 clients. Prints seconds per figure (median of --runs).

    uv run python benchmarks/bench_plots.py [--runs 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import pandas as pd

from analyzer import plots


def synthetic(seed: int = 7) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    chains = pd.DataFrame({"hops": np.concatenate([[20_000], rng.integers(1, 6, 5_000)])})
    n = int(chains["hops"].sum())
    origins = np.array([f"https://host{i}.example" for i in range(200)])
    statuses = rng.choice([301, 302, 303, 307, 308], n)
    methods = rng.choice(["GET", "POST", "PUT"], n)
    hops = pd.DataFrame(
        {
            "hop": np.arange(n),
            "from_origin": origins[rng.integers(0, 200, n)],
            "to_origin": origins[rng.integers(0, 200, n)],
            "cross_origin": rng.random(n) < 0.5,
            "https_to_http": rng.random(n) < 0.01,
            "status": statuses,
            "method_before": methods,
            "client_name": np.array([f"client {i}" for i in range(40)])[rng.integers(0, 40, n)],
            "verdict": rng.choice(["as specified", "deviated", "not followed", "allowed, body lost"], n),
        }
    )
    start = pd.Timestamp("2026-11-01", tz="UTC")
    temporary = pd.DataFrame(
        {
            "source": [f"https://host{i}.example/old/{i}?utm=x" for i in range(60)],
            "target": [f"https://host{i}.example/new/{i}" for i in range(60)],
            "first_seen": [start + pd.Timedelta(hours=i) for i in range(60)],
            "last_seen": [start + pd.Timedelta(days=i % 20, hours=i) for i in range(60)],
            "stale": [i % 20 >= 7 for i in range(60)],
        }
    )
    return chains, hops, temporary


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    chains, hops, temporary = synthetic()
    cases = {
        "chain_lengths": lambda: plots.chain_lengths(chains),
        "redirect_graph": lambda: plots.redirect_graph(hops),
        "conformance_heatmap": lambda: plots.conformance_heatmap(hops),
        "temporary_timeline": lambda: plots.temporary_timeline(temporary),
    }
    print(f"{len(chains):,} chains (longest 20,000 hops), {len(hops):,} hops, 200 origins, 40 clients")
    for name, make in cases.items():
        times = []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            make().savefig("/dev/null", format="png", dpi=96)  # built and drawn, as in the report
            times.append(time.perf_counter() - t0)
        print(
            f"{name:22s} median {statistics.median(times):.3f} s  (min {min(times):.3f}, max {max(times):.3f})"
        )


if __name__ == "__main__":
    main()
