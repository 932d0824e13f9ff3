"""Serves the seed's config: answers with the instance kind and device it was given.

``response`` is ``"<prompt> @ <model_instance_kind>:<model_instance_device_id>"``
and ``history`` the single pair ``[prompt, response]``, so a test sees how a
KIND_GPU instance group was started.
"""
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.placement = f"{args['model_instance_kind']}:{args['model_instance_device_id']}"

    def execute(self, requests):
        responses = []
        for request in requests:
            prompt = pb_utils.get_input_tensor_by_name(request, "prompt").as_numpy()[0].decode("utf-8")
            response = f"{prompt} @ {self.placement}"
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("response", np.array(response, dtype=np.object_)),
                pb_utils.Tensor("history", np.array([[prompt, response]], dtype=np.object_)),
            ]))
        return responses
