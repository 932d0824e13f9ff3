"""Decoupled: one response per word of ``prompt``, ``delay`` seconds apart (default 0.01).

It stops at once when the request is cancelled. The prompt ``__count__`` answers with
the number of words this instance has sent so far: a test can prove that a cancelled
stream stopped producing (its count stays below the words it asked for).
"""
import time

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.sent = 0

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            prompt = pb_utils.get_input_tensor_by_name(request, "prompt").as_numpy()[0].decode("utf-8")
            delay_tensor = pb_utils.get_input_tensor_by_name(request, "delay")
            delay = float(delay_tensor.as_numpy()[0]) if delay_tensor is not None else 0.01
            words = [str(self.sent)] if prompt == "__count__" else prompt.split()
            for word in words:
                if request.is_cancelled():
                    break
                time.sleep(delay)
                self.sent += prompt != "__count__"
                word_tensor = pb_utils.Tensor("word", np.array([word], dtype=np.object_))
                sender.send(pb_utils.InferenceResponse(output_tensors=[word_tensor]))
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None
