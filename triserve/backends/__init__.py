"""Backends run models. The core picks one by the ``backend`` field of config.pbtxt
(the registry and the contract, ``Backend``/``Job``/``ModelContext``, live in
``triserve.core.backend``)."""
