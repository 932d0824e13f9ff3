"""LangChain integration: ``ChatTriserve`` (chat model over the OpenAI-compatible API)
and ``TriserveLLM`` (the seed's LLM class over KServe v2). Needs ``triserve[langchain]``."""

from triserve.langchain.chat_model import ChatTriserve
from triserve.langchain.llm import TriserveLLM
from triserve.langchain.transport import TriserveError

__all__ = ["ChatTriserve", "TriserveLLM", "TriserveError"]
