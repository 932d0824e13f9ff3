"""Answers with its pid; ``exit:N`` ends the process inside execute, ``sleep:S`` is slow.

Once ``sleep:S`` runs, ``$TRISERVE_TEST_STATE/<pid>.busy`` exists. Each ``initialize``
appends a line to ``$TRISERVE_TEST_STATE/<model>.init``, so a test sees the restarts; a
restart (not the first start) takes 1 s, so that the time without a live instance is long
enough to observe.
"""
import os
import time

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        log = os.path.join(os.environ["TRISERVE_TEST_STATE"], args["model_name"] + ".init")
        restart = os.path.exists(log)
        with open(log, "a") as file:
            file.write(f"{os.getpid()}\n")
        if restart:
            time.sleep(1.0)

    def execute(self, requests):
        responses = []
        for request in requests:
            action = pb_utils.get_input_tensor_by_name(request, "ACTION").as_numpy()[0].decode()
            if action.startswith("exit:"):
                os._exit(int(action[5:]))
            if action.startswith("sleep:"):
                busy = os.path.join(os.environ["TRISERVE_TEST_STATE"], f"{os.getpid()}.busy")
                open(busy, "w").close()  # a test can wait until the request runs here
                time.sleep(float(action[6:]))
            pid = pb_utils.Tensor("PID", np.array([os.getpid()], dtype=np.int64))
            responses.append(pb_utils.InferenceResponse(output_tensors=[pid]))
        return responses
