"""Sleeps INPUT0[0] seconds, then answers the order in which its requests executed (0, 1, 2, ...)."""
import time

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.executed = 0

    def execute(self, requests):
        responses = []
        for request in requests:
            time.sleep(float(pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy().reshape(-1)[0]))
            order = pb_utils.Tensor("ORDER", np.array([[self.executed]], dtype=np.int64))
            self.executed += 1
            responses.append(pb_utils.InferenceResponse(output_tensors=[order]))
        return responses
