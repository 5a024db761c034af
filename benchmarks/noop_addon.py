"""A script that does nothing with each response: what any `mitmdump -s` script costs.

    uv run python benchmarks/bench_proxy.py --script benchmarks/noop_addon.py

Its hook is a module-level function, as the recorder's are: the cheapest shape a
script can take (an `addons = [...]` list would put one more stop on mitmproxy's walk
over the addons, for every event).
"""


def response(flow) -> None:
    pass
