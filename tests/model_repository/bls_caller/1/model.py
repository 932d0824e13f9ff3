"""Calls identity_fp32 through BLS, once with exec() and once with async_exec().

SYNC is identity_fp32(INPUT0) and ASYNC is identity_fp32(INPUT0 + 1); a BLS
error response becomes this model's error.
"""
import triton_python_backend_utils as pb_utils


def bls_request(values):
    return pb_utils.InferenceRequest(
        model_name="identity_fp32",
        inputs=[pb_utils.Tensor("INPUT0", values)],
        requested_output_names=["OUTPUT0"],
    )


def output_of(response):
    if response.has_error():
        raise pb_utils.TritonModelException(response.error().message())
    return pb_utils.get_output_tensor_by_name(response, "OUTPUT0").as_numpy()


class TritonPythonModel:
    async def execute(self, requests):
        responses = []
        for request in requests:
            values = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            sync_output = output_of(bls_request(values).exec())
            async_output = output_of(await bls_request(values + 1).async_exec())
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("SYNC", sync_output),
                pb_utils.Tensor("ASYNC", async_output),
            ]))
        return responses
