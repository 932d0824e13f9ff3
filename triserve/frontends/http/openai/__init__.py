"""The OpenAI-compatible API (see :mod:`.api` for the routes)."""

from triserve.frontends.http.openai.api import routes

__all__ = ["routes"]
