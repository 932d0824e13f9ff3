"""What ``triserve bench`` sends: the seed's chat request, or the requests of an input file in
perf_analyzer's JSON format (``{"data": [{"INPUT": {"content": [...], "shape": [...]}}, ...]}``,
or OpenAI request bodies as ``{"data": [{"payload": [{...}]}]}``)."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# The seed's client (its gRPC client and LangChain class send exactly these).
SEED_PROMPT = "请给出一个具体示例"
SEED_HISTORY = [
    "你知道鸡兔同笼问题么",
    "鸡兔同笼问题是一个经典的数学问题,涉及到基本的代数方程和解题方法。"
    "问题描述为:在一个笼子里面,有若干只鸡和兔子,已知它们的总数和总腿数,问鸡和兔子的数量各是多少?\n\n"
    "解法如下:假设鸡的数量为x,兔子的数量为y,则总腿数为2x+4y。根据题意,可以列出方程组:\n\n"
    "x + y = 总数\n2x + 4y = 总腿数\n\n"
    "通过解方程组,可以求得x和y的值,从而确定鸡和兔子的数量。",
]
SEED_TEMPERATURE = "0.01"
SEED_MAX_TOKEN = "16000"
SEED_HISTORY_LEN = "10"


class InputError(ValueError):
    """The input file or the model's inputs do not fit; the message says where."""


@dataclass(frozen=True)
class Tensor:
    name: str
    datatype: str
    array: np.ndarray


def seed_entry(prompt: str, temperature: str, max_token: str, history_len: str) -> dict[str, Any]:
    """The seed's chat request as one perf_analyzer data entry."""
    return {"prompt": [prompt], "history": list(SEED_HISTORY), "temperature": [temperature],
            "max_token": [max_token], "history_len": [history_len]}


def load_file(path: Path) -> list[dict[str, Any]]:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"--input-data {path}: {exc}") from None
    data = document.get("data") if isinstance(document, dict) else None
    if not isinstance(data, list) or not data or not all(isinstance(entry, dict) for entry in data):
        raise InputError(f"--input-data {path}: expected perf_analyzer's format, "
                         '{"data": [{"INPUT_NAME": {"content": [...], "shape": [...]}}, ...]}')
    return data


def _content(name: str, value: Any) -> tuple[list[Any], list[int] | None]:
    """A data entry's value: a plain list, or ``{"content": [...], "shape": [...]}``,
    or ``{"b64": "..."}`` (one BYTES element)."""
    if isinstance(value, dict):
        if "b64" in value:
            return [base64.b64decode(value["b64"])], value.get("shape")
        if "content" not in value:
            raise InputError(f"input '{name}': expected a list, or an object with 'content' (and 'shape')")
        return list(np.asarray(value["content"], dtype=object).reshape(-1)), value.get("shape")
    if isinstance(value, list):
        return list(np.asarray(value, dtype=object).reshape(-1)), None
    return [value], None


def kserve_tensors(entry: dict[str, Any], metadata: dict[str, Any], batched: bool,
                   extra: dict[str, list[str]]) -> list[Tensor]:
    """One request's input tensors for a KServe model, typed by its metadata. ``extra`` holds
    inputs the tool adds (``max_new_tokens``, ``stream``), sent only if the model declares them."""
    declared = {tensor["name"]: tensor for tensor in metadata["inputs"]}
    unknown = sorted(set(entry) - set(declared))
    if unknown:
        raise InputError(f"input(s) {', '.join(unknown)} are not inputs of model '{metadata['name']}' "
                         f"(its inputs: {', '.join(declared)})")
    values = {**{name: value for name, value in extra.items() if name in declared}, **entry}
    tensors = []
    for name, value in values.items():
        datatype = declared[name]["datatype"]
        content, shape = _content(name, value)
        if datatype == "BYTES":
            array = np.array([item if isinstance(item, bytes) else str(item).encode("utf-8")
                              for item in content], dtype=object)
        else:
            from tritonclient.utils import triton_to_np_dtype

            try:
                array = np.array(content, dtype=triton_to_np_dtype(datatype))
            except (TypeError, ValueError) as exc:
                raise InputError(f"input '{name}' ({datatype}): {exc}") from None
        try:
            array = array.reshape(shape if shape else [len(content)])
        except ValueError:
            raise InputError(f"input '{name}': {len(content)} values do not fit shape {shape}") from None
        if batched:
            array = array[np.newaxis, ...]
        tensors.append(Tensor(name, datatype, array))
    return tensors


def _text(entry: dict[str, Any], name: str) -> list[str]:
    if name not in entry:
        return []
    content, _ = _content(name, entry[name])
    return [item.decode("utf-8") if isinstance(item, bytes) else str(item) for item in content]


def openai_body(entry: dict[str, Any], model: str, sampling: dict[str, Any]) -> dict[str, Any]:
    """One request's OpenAI chat body: an entry's ``payload`` (genai-perf / perf_analyzer's
    OpenAI format) as it is, or a chat-contract entry (prompt, history, system) as messages."""
    if "payload" in entry:
        payload = entry["payload"]
        body = payload[0] if isinstance(payload, list) and payload else payload
        if not isinstance(body, dict) or "messages" not in body:
            raise InputError("a 'payload' entry must hold an OpenAI chat request with 'messages'")
        return {"model": model, **sampling, **body}
    prompt = _text(entry, "prompt")
    if not prompt:
        raise InputError("for --protocol openai each data entry needs 'prompt' (or an OpenAI 'payload')")
    history = _text(entry, "history")
    if len(history) % 2:
        raise InputError("'history' must hold [question, answer] pairs")
    messages = [{"role": "system", "content": text} for text in _text(entry, "system")]
    for question, answer in zip(history[::2], history[1::2]):
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    messages.append({"role": "user", "content": prompt[0]})
    body = {"model": model, "messages": messages, **sampling}
    temperature = _text(entry, "temperature")
    if temperature and "temperature" not in sampling:
        body["temperature"] = float(temperature[0])
    return body
