"""triserve: a pip-installable, Triton-compatible inference server for chat LLMs."""

__version__ = "0.1.0"
