"""Waits until its request is cancelled, for at most a given time: a client's going away made visible.

INPUT0 ``"<seconds> <path>"``: create the file ``path`` (the test then knows the model has
the request), then poll ``request.is_cancelled()`` every 10 ms for up to ``seconds``.
INPUT0 ``"__cancelled__"``: answer how many requests this instance saw cancelled so far.
"""
import time
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.cancelled = 0

    def execute(self, requests):
        responses = []
        for request in requests:
            text = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy().reshape(-1)[0].decode()
            if text == "__cancelled__":
                answer = str(self.cancelled)
            else:
                seconds, path = text.split(" ", 1)
                Path(path).touch()
                deadline = time.monotonic() + float(seconds)
                while not request.is_cancelled() and time.monotonic() < deadline:
                    time.sleep(0.01)
                self.cancelled += request.is_cancelled()
                answer = "cancelled" if request.is_cancelled() else "not cancelled"
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("OUTPUT0", np.array([answer.encode()], dtype=np.object_))]))
        return responses
