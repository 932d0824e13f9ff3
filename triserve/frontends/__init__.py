"""Frontends: wire formats (KServe HTTP and gRPC, OpenAI, the seed's JSON, ChatGLM, /metrics)
decoded into the core's request type and encoded back. A frontend never imports a backend."""
