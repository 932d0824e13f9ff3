"""``TriserveLLM``: the seed's ``ChatGLM(LLM)`` class, fixed.

It keeps the seed's fields (``url``, ``max_token``, ``temperature``, ``history_len``)
and its ``chat(query, history) -> (response, history)``, and talks KServe v2 JSON
(``POST /v2/models/{model}/infer``) instead of the seed's base64 ``Predict`` body:
strings travel as plain JSON (no base64, no length-prefix decoding), errors come
back as ``{"error": "<message>"}``, and the same class also works against a real
Triton serving the seed's unmodified ``chatglm2-6b``.

What the seed got wrong and this class fixes: an HTTP error raises with the server's
message (the seed returned the string "查询结果错误" as if it were the answer); stop
words cut the *text* (the seed passed the HTTP response object to
``enforce_stop_tokens``); the model name is a field, not hard-coded.
"""

from __future__ import annotations

import re
from typing import Any

from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models.llms import LLM
import httpx
from langchain_core.utils import secret_from_env
from pydantic import Field, PrivateAttr, SecretStr, field_validator

from triserve.langchain.transport import bearer_headers, raise_for_error, sync_client

# The seed's Predict URL (its article spells the path both ways).
_SEED_PREDICT_PATH = re.compile(r"/+Mu(?:lti|til)BackendService/Predict/*$")

History = list[list[str]]


def server_base(url: str) -> str:
    """The server's base URL, from either the base itself or the seed's full Predict URL."""
    return _SEED_PREDICT_PATH.sub("", url).rstrip("/")


def cut_at_stop(text: str, stop: list[str] | None) -> str:
    """``text`` up to the earliest stop string (plain substring search, no regex)."""
    positions = [text.find(word) for word in stop or [] if word]
    found = [position for position in positions if position >= 0]
    return text[:min(found)] if found else text


def _bytes_input(name: str, values: list[str]) -> dict[str, Any]:
    return {"name": name, "datatype": "BYTES", "shape": [len(values)], "data": values}


class TriserveLLM(LLM):
    """A text-in, text-out LangChain LLM over a triserve (or Triton) chat model.

    ```python
    from triserve.langchain import TriserveLLM

    llm = TriserveLLM(url="http://127.0.0.1:8000")  # api_key=... (or $TRISERVE_API_KEY) if the server needs one
    answer, history = llm.chat("What is 2 + 2?")
    answer, history = llm.chat("And times 3?", history)
    ```
    """

    url: str = "http://127.0.0.1:8000"
    model: str = "smollm2"
    max_token: int = 32000  # ChatGLM's max_length: prompt + reply, capped at the context length
    temperature: float = 0.01
    history_len: int = 10
    max_new_tokens: int | None = None  # cap on the reply alone (the chat contract's max_new_tokens)
    timeout: float = 120.0
    max_retries: int = 2
    # sent as 'Authorization: Bearer <key>' (a server started with --api-key needs it)
    api_key: SecretStr | None = Field(default_factory=secret_from_env("TRISERVE_API_KEY", default=None))

    _http: httpx.Client | None = PrivateAttr(default=None)  # one per object: connections are reused

    @field_validator("url")
    @classmethod
    def _accept_seed_url(cls, url: str) -> str:
        return server_base(url)

    @property
    def _llm_type(self) -> str:
        return "triserve"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"url": self.url, "model": self.model, "max_token": self.max_token,
                "temperature": self.temperature, "history_len": self.history_len,
                "max_new_tokens": self.max_new_tokens}

    @property
    def _headers(self) -> dict[str, str]:
        return bearer_headers(self.api_key)

    def _infer_body(self, query: str, history: History) -> dict[str, Any]:
        flat_history = [text for pair in history for text in pair]
        inputs = [
            _bytes_input("prompt", [query]),
            _bytes_input("history", flat_history),
            _bytes_input("temperature", [str(self.temperature)]),
            _bytes_input("max_token", [str(self.max_token)]),
            _bytes_input("history_len", [str(self.history_len)]),
        ]
        if self.max_new_tokens is not None:
            inputs.append(_bytes_input("max_new_tokens", [str(self.max_new_tokens)]))
        return {"inputs": inputs, "outputs": [{"name": "response"}, {"name": "history"}]}

    def chat(self, query: str, history: History | None = None,
             stop: list[str] | None = None) -> tuple[str, History]:
        """One turn: the answer, and ``history`` with this turn appended as ``[query, answer]``.

        The history comes from the model's ``history`` output (so a model that trims it
        by ``history_len`` is respected); with stop words, the last answer in it is cut too.
        """
        if self._http is None:
            self._http = sync_client(self.timeout, self.max_retries)
        response = self._http.post(f"{self.url}/v2/models/{self.model}/infer",
                                   json=self._infer_body(query, history or []), headers=self._headers)
        raise_for_error(response)
        outputs = {output["name"]: output["data"] for output in response.json()["outputs"]}
        answer = cut_at_stop(outputs["response"][0], stop)
        flat = outputs.get("history", [])
        new_history = [[flat[i], flat[i + 1]] for i in range(0, len(flat) - 1, 2)]
        if new_history:
            new_history[-1][1] = answer
        return answer, new_history

    def _call(self, prompt: str, stop: list[str] | None = None,
              run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> str:
        if kwargs:
            raise TypeError(f"TriserveLLM got unexpected arguments: {', '.join(sorted(kwargs))}")
        answer, _ = self.chat(prompt, stop=stop)
        return answer
