"""The tools a user reaches for first: ``triserve chat`` (a terminal chat) and ``triserve bench``
(a load generator for any KServe v2 or OpenAI endpoint). They are clients: they talk to a
server over HTTP or gRPC, never to the core."""
