"""Decoupled: one response per word of ``prompt``, then a final flag with no response."""
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            prompt = pb_utils.get_input_tensor_by_name(request, "prompt").as_numpy()[0].decode("utf-8")
            for word in prompt.split():
                if request.is_cancelled():
                    break
                word_tensor = pb_utils.Tensor("word", np.array([word], dtype=np.object_))
                sender.send(pb_utils.InferenceResponse(output_tensors=[word_tensor]))
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None
