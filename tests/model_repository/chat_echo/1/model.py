"""The seed's chat model with the LLM replaced by an echo.

It reads its inputs and builds its outputs exactly as the seed's ChatGLM2
model.py does: ``response`` is a 0-d numpy ``str`` array and ``history`` a 2-D
``[n, 2]`` array of ``str``, both cast with the dtype from the output config.
The server must send them with these shapes, UTF-8 encoded.
"""
import json

import numpy as np
import triton_python_backend_utils as pb_utils


def first_string(request, name):
    return pb_utils.get_input_tensor_by_name(request, name).as_numpy()[0].decode("utf-8")


class TritonPythonModel:
    def initialize(self, args):
        self.model_config = json.loads(args["model_config"])
        response_config = pb_utils.get_output_config_by_name(self.model_config, "response")
        history_config = pb_utils.get_output_config_by_name(self.model_config, "history")
        self.response_dtype = pb_utils.triton_string_to_numpy(response_config["data_type"])
        self.history_dtype = pb_utils.triton_string_to_numpy(history_config["data_type"])

    def execute(self, requests):
        responses = []
        for request in requests:
            prompt = first_string(request, "prompt")
            history_in = pb_utils.get_input_tensor_by_name(request, "history").as_numpy()
            if len(history_in) > 0:
                history = np.array([item.decode("utf-8") for item in history_in]).reshape((-1, 2)).tolist()
            else:
                history = []
            temperature = float(first_string(request, "temperature"))
            max_token = int(first_string(request, "max_token"))
            history_len = int(first_string(request, "history_len"))
            history = history[-history_len:] if history_len > 0 else []

            response = f"echo: {prompt} (temperature={temperature}, max_token={max_token})"
            history = history + [[prompt, response]]

            response = np.array(response)
            history = np.array(history)
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("response", response.astype(self.response_dtype)),
                pb_utils.Tensor("history", history.astype(self.history_dtype)),
            ]))
        return responses

    def finalize(self):
        print("Cleaning up...")
