"""Returns INPUT0 as OUTPUT0, and in OUTPUT1 the batch size execute() ran with.

The batch size is the sum of the requests' batch dimensions, so a client sees
OUTPUT1 > 1 only when the dynamic batcher merged its request with others.
"""
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        inputs = [pb_utils.get_input_tensor_by_name(r, "INPUT0").as_numpy() for r in requests]
        executed_batch = sum(array.shape[0] for array in inputs)
        responses = []
        for array in inputs:
            batch_size = np.full((array.shape[0], 1), executed_batch, dtype=np.int32)
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("OUTPUT0", array),
                pb_utils.Tensor("OUTPUT1", batch_size),
            ]))
        return responses
