"""Scale-out: a model repository on a Ray Serve cluster, and KServe manifests.

``from triserve.deploy import TritonModel`` is the seed's SDK::

    predictor = TritonModel("chatglm2-6b").deploy(path="model_repository/chatglm2-6b",
                                                   protocol="http", cpu=4, memory=30,
                                                   use_gpu=True, override=True, instances=2)
    predictor.predict("hello", history=[], temperature=0.01, max_token=1024, history_len=10)

Ray (``pip install triserve[ray]``) is imported only by the modules that need it, so
``triserve kserve`` and ``triserve.deploy.spec`` work without it. See docs/deploy.md.
"""

from __future__ import annotations

from typing import Any

__all__ = ["TritonModel", "Predictor", "DeployError", "status", "undeploy"]


def __getattr__(name: str) -> Any:
    if name in ("TritonModel", "Predictor", "status", "undeploy"):
        from triserve.deploy import sdk

        return getattr(sdk, name)
    if name == "DeployError":
        from triserve.deploy.spec import DeployError

        return DeployError
    raise AttributeError(f"module 'triserve.deploy' has no attribute {name!r}")
