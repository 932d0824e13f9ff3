"""The HTTP frontend (KServe v2 REST, generate, OpenAI, the seed's JSON predict,
ChatGLM's api.py); :func:`triserve.frontends.http.app.create_app` builds it."""
