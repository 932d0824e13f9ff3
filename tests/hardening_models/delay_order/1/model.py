"""Answers with the order in which its requests executed (0, 1, 2, ...), 1 s each."""
import time

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.executed = 0

    def execute(self, requests):
        time.sleep(1.0)
        responses = []
        for _ in requests:
            order = pb_utils.Tensor("ORDER", np.array([[self.executed]], dtype=np.int64))
            self.executed += 1
            responses.append(pb_utils.InferenceResponse(output_tensors=[order]))
        return responses
