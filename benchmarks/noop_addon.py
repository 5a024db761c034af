"""An addon that does nothing with each response: what any `mitmdump -s` script costs.

    uv run python benchmarks/bench_proxy.py --script benchmarks/noop_addon.py
"""


class Noop:
    def response(self, flow) -> None:
        pass


addons = [Noop()]
