"""An ``async def execute`` model: the stub must run it in an event loop."""
import asyncio

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    async def execute(self, requests):
        await asyncio.sleep(0.01)
        responses = []
        for request in requests:
            doubled = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy() * 2
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("OUTPUT0", doubled)]))
        return responses
