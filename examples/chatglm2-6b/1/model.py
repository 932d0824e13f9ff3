"""ChatGLM2-6B as a streaming Triton Python-backend model, built from triserve's LLM pieces.

ChatGLM2 ships its own modelling code (``trust_remote_code``), which triserve's
batched engine does not implement (it runs the Llama family), so this model
generates with the checkpoint's own ``generate`` on the GPU, one request at a
time per instance. Everything that does not depend on the architecture is
triserve's: the chat contract (``chat.py``: the seed's BYTES inputs, history
pairs, ``max_token`` as ChatGLM's ``max_length``, errors naming the input) and
streaming text (``detokenize.py``: whole UTF-8 characters, stop strings).

Responses go through the decoupled response sender: with ``stream`` one per
piece of text, the last one also carrying ``history``; without it one response.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import triton_python_backend_utils as pb_utils
from transformers import AutoModel, AutoTokenizer, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from triserve.backends.llm.chat import CHAT_INPUTS, ChatRequest, parse_chat_inputs, stop_token_ids
from triserve.backends.llm.detokenize import ReplyText
from triserve.core.errors import ErrorCode, InferError

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
_ERROR_CODES = {ErrorCode.INVALID_ARGUMENT: pb_utils.TritonError.INVALID_ARG}


class _ReplySender(BaseStreamer, StoppingCriteria):
    """``generate``'s streamer and stopping criterion: each new token goes through the
    reply text to the response sender, and a stop string ends generation."""

    def __init__(self, sender, chat: ChatRequest, reply: ReplyText):
        self._sender = sender
        self._chat = chat
        self.reply = reply
        self._prompt_seen = False
        self.completion_tokens = 0

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate streams the prompt first
            self._prompt_seen = True
            return
        tokens = value.reshape(-1).tolist()
        self.completion_tokens += len(tokens)
        piece = self.reply.add(tokens)
        if piece and self._chat.stream:
            self._sender.send(pb_utils.InferenceResponse([_text("response", piece)]))

    def end(self) -> None:
        """Nothing to do: the final response is sent once ``generate`` has returned."""

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.reply.stopped, dtype=torch.bool,
                          device=input_ids.device)


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        parameters = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        path = Path(parameters["model"])
        self.model_name = args["model_name"]
        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True, local_files_only=True)
        dtype = _DTYPES[parameters.get("dtype", "float16")]
        device = f"cuda:{args['model_instance_device_id']}"
        model = AutoModel.from_pretrained(path, trust_remote_code=True, local_files_only=True, dtype=dtype)
        self.model = model.to(device).eval()
        self.device = device
        self.context = self.model.config.seq_length  # ChatGLM2's context (32k for ChatGLM2-6B-32K)
        self.stop_token_ids = sorted(stop_token_ids(self.tokenizer, self.model.generation_config))

    def execute(self, requests) -> None:
        for request in requests:
            sender = request.get_response_sender()
            try:
                self._answer(request, sender)
            except InferError as error:
                code = _ERROR_CODES.get(error.code, pb_utils.TritonError.INTERNAL)
                sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(error.message, code)),
                            flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def _answer(self, request, sender) -> None:
        arrays = {name: tensor.as_numpy() for name in CHAT_INPUTS
                  if (tensor := pb_utils.get_input_tensor_by_name(request, name)) is not None}
        chat = parse_chat_inputs(arrays).resolved()  # unset sampling values: OpenAI's defaults
        # ChatGLM2's own prompt format ("[Round 1]\n\n问：...\n\n答："), as its model.chat builds it.
        text = chat.prompt if chat.raw else self.tokenizer.build_prompt(chat.prompt, list(chat.context_history))
        prompt_ids = self.tokenizer(text)["input_ids"]
        budget = chat.reply_budget(len(prompt_ids), self.context, self.model_name)
        reply_sender = _ReplySender(sender, chat, ReplyText(self.tokenizer, prompt_ids, chat.stop))
        if chat.seed is not None:
            torch.manual_seed(chat.seed)
        with torch.inference_mode():
            output = self.model.generate(
                torch.tensor([prompt_ids], device=self.device),
                max_new_tokens=budget,
                do_sample=chat.temperature > 0,
                temperature=chat.temperature or None,
                top_p=chat.top_p,
                top_k=chat.top_k or None,
                repetition_penalty=chat.repetition_penalty,
                eos_token_id=self.stop_token_ids,
                streamer=reply_sender,
                stopping_criteria=StoppingCriteriaList([reply_sender]),
            )
        reply = reply_sender.reply
        rest = reply.finish()
        hit_eos = output[0, -1].item() in self.stop_token_ids
        finish_reason = "stop" if reply.stopped or hit_eos else "length"
        response = pb_utils.InferenceResponse(
            [_text("response", rest if chat.stream else reply.text),
             pb_utils.Tensor("history", chat.history_with(reply.text))],
            parameters={"prompt_tokens": len(prompt_ids), "completion_tokens": reply_sender.completion_tokens,
                        "cached_tokens": 0, "finish_reason": finish_reason},
        )
        sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def finalize(self) -> None:
        del self.model
        torch.cuda.empty_cache()


def _text(name: str, text: str) -> "pb_utils.Tensor":
    return pb_utils.Tensor(name, np.array([text.encode("utf-8")], dtype=np.object_))
