"""Returns the pid of the instance process that ran the request.

It sleeps a little so that concurrent requests occupy both instances.
"""
import os
import time

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        time.sleep(0.05)
        pid = pb_utils.Tensor("PID", np.array([os.getpid()], dtype=np.int64))
        return [pb_utils.InferenceResponse(output_tensors=[pid]) for _ in requests]
