"""pytest-redirect-audit: `pytest --redirect-audit`, the test environment's half of redirect-audit.

Standard library and pytest only. The recorder, the store and the analysis run in
redirect-audit's own environment (`pytest_redirect_audit.tool` finds it).
"""

__version__ = "0.1.0"
