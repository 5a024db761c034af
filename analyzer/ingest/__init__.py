"""Turning captures (HAR files, mitmproxy flows) into stored exchanges."""

from analyzer.ingest.common import CaptureOptions, ImportError_, ImportResult
from analyzer.ingest.har import import_har

__all__ = ["CaptureOptions", "ImportError_", "ImportResult", "import_har"]
