"""execute() raises; the client must see this message and the instance keep serving."""


class TritonPythonModel:
    def execute(self, requests):
        raise ValueError("raises: this model always fails in execute")
