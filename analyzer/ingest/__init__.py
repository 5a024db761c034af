"""Turning captures (HAR files, mitmproxy flows) into stored exchanges."""

from analyzer.ingest.common import AlreadyImported, CaptureOptions, ImportError_, ImportResult
from analyzer.ingest.har import import_har

__all__ = ["AlreadyImported", "CaptureOptions", "ImportError_", "ImportResult", "import_har"]
