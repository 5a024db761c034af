"""A script that only does what the recorder does to the cycle collector at start-up.

    uv run python benchmarks/bench_proxy.py --script benchmarks/freeze_addon.py

The recorder collects and freezes the heap once the proxy runs (`gc.freeze()`, see
addons/redirect_recorder.py), so the cycle collector's full scans skip what was alive
then: mitmproxy's modules as well as its own. This script does that and nothing else,
so it shows how much of the recorder's measured cost the freeze takes back by sparing
mitmproxy's own heap: the recorder's cost without that help is its measured cost minus
this script's.
"""

import gc


def running() -> None:
    gc.collect()
    gc.freeze()
