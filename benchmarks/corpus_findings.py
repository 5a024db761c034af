"""Findings per rule on the real HAR corpus: all of them, and what the default configuration shows.

    uv run python benchmarks/corpus_findings.py [--corpus tests/corpus/har/good]

Each HAR goes into a fresh store, is analyzed, and its findings are counted twice: every
finding the rules made (what `findings --third-party` lists), and those the default
selection shows (`findings` with no configuration file: redirects between third parties
of a browser page are suppressed and counted). Prints one line per HAR with findings,
then the totals per rule, and the third-party redirects each browsing HAR holds.
"""

from __future__ import annotations

import argparse
import tempfile
from collections import Counter
from pathlib import Path

from analyzer.analysis import analyze
from analyzer.ingest import import_har
from analyzer.report import finding_records, third_party_redirects
from analyzer.selection import Selection
from analyzer.store import open_store
from analyzer.storeread import open_reader

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=ROOT / "tests" / "corpus" / "har" / "good")
    args = parser.parse_args()
    every, shown_total = Counter[str](), Counter[str]()
    print(f"{'HAR':58} {'all':>4} {'shown':>5} {'3rd-party redirects':>20}")
    with tempfile.TemporaryDirectory() as tmp:
        for path in sorted(args.corpus.glob("*.har")):
            db = str(Path(tmp) / f"{path.stem}.db")
            store = open_store(db)
            try:
                import_har(store, path)
                analyze(store)
            finally:
                store.close()
            with open_reader(db) as reader:
                records = finding_records(reader)
                hops, chains = third_party_redirects(reader)
            shown, _ = Selection().apply(records)
            every.update(f"{r['rule_id']} {r['rule']}" for r in records)
            shown_total.update(f"{r['rule_id']} {r['rule']}" for r in shown)
            if records or hops:
                crowd = f"{hops} in {chains} chain(s)" if hops else "-"
                print(f"{path.stem[:58]:58} {len(records):>4} {len(shown):>5} {crowd:>20}")
    print(f"\n{'rule':40} {'all':>4} {'shown':>5}")
    for rule in sorted(every):
        print(f"{rule:40} {every[rule]:>4} {shown_total[rule]:>5}")
    print(f"{'total':40} {sum(every.values()):>4} {sum(shown_total.values()):>5}")


if __name__ == "__main__":
    main()
