"""Sends COUNT responses of SIZE bytes each from execute, as fast as the server takes them, and
stops when the request is cancelled. The number sent so far is in $TRISERVE_TEST_STATE/flood_sent."""
import os

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        state = os.environ.get("TRISERVE_TEST_STATE")
        self.counter = os.path.join(state, "flood_sent") if state else None

    def execute(self, requests):
        for request in requests:
            count = int(pb_utils.get_input_tensor_by_name(request, "COUNT").as_numpy().reshape(-1)[0])
            size = int(pb_utils.get_input_tensor_by_name(request, "SIZE").as_numpy().reshape(-1)[0])
            sender = request.get_response_sender()
            data = pb_utils.Tensor("DATA", np.array([b"x" * size], dtype=np.object_))
            for sent in range(1, count + 1):
                if request.is_cancelled():
                    break
                sender.send(pb_utils.InferenceResponse(output_tensors=[data]))
                if self.counter:
                    with open(self.counter + ".tmp", "w") as file:
                        file.write(str(sent))
                    os.replace(self.counter + ".tmp", self.counter)
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None
