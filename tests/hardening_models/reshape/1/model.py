"""Returns its input times 10, and the shape it received (without the batch dimension)."""
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            data = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            if data.shape[1:] != (2, 2):
                raise pb_utils.TritonModelException(f"expected [batch, 2, 2], got {list(data.shape)}")
            seen = np.array([list(data.shape)], dtype=np.int64).repeat(data.shape[0], axis=0)
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("OUTPUT0", data * 10), pb_utils.Tensor("SEEN_SHAPE", seen)]))
        return responses
