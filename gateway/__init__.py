"""EWS Call Gateway: JSON/HTTP in front of Exchange Unified Messaging phone calls."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ews-call-gateway")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["__version__"]
