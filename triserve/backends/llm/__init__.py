"""The ``llm`` backend: chat models run in-process by a continuous-batching engine.

``backend`` (the Backend the core loads) ties together ``loader`` (config
parameters -> HF model and tokenizer), ``chat`` (the chat contract),
``detokenize`` (tokens -> streamed text), ``metrics`` and the engine
(``engine``, ``model_runner``, ``kv_cache``, ``prefix_cache``, ``sampling``,
``quantization``). Nothing is imported here, so that importing one of them
does not load torch for the others.
"""
