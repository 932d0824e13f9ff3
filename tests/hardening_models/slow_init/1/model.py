import time


class TritonPythonModel:
    def initialize(self, args):
        time.sleep(30)

    def execute(self, requests):
        return []
