"""Answers with its pid; its finalize never finishes in time."""
import os
import time

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        pid = pb_utils.Tensor("PID", np.array([os.getpid()], dtype=np.int64))
        return [pb_utils.InferenceResponse(output_tensors=[pid]) for _ in requests]

    def finalize(self):
        time.sleep(60)
