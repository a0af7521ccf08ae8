"""agentlink: the runtime every agent process runs, and the library the toolkit calls."""

__version__ = "0.1.0"
