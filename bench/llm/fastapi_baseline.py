"""The usual way to serve a chat LLM: FastAPI + uvicorn + transformers, one ``generate`` per request.

The endpoint is ChatGLM2-6B's ``api.py`` (the deployment the seed calls "most
deployments"), with SmolLM2-135M-Instruct in place of ChatGLM: POST / with
``{"prompt", "history": [[q, a], ...], "max_length", "temperature", "top_p"}``
answers ``{"response", "history", "status", "time"}``. Like api.py, the handler
is ``async`` and calls the blocking ``generate`` directly, so requests run one
at a time; ``max_length`` counts prompt plus reply tokens, as ChatGLM's does.

    python -m bench.llm.fastapi_baseline --port 8100 [--threads N]   # default: torch's (OMP_NUM_THREADS or all cores)
"""

from __future__ import annotations

import argparse
import datetime

import torch
import uvicorn
from fastapi import FastAPI, Request
from transformers import AutoModelForCausalLM, AutoTokenizer

from bench.llm.weights import GGUF_FILE, weights_dir


def create_app(model: AutoModelForCausalLM, tokenizer: AutoTokenizer) -> FastAPI:
    app = FastAPI()

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.post("/")
    async def chat(request: Request) -> dict:
        body = await request.json()
        history = body.get("history") or []
        messages = []
        for question, answer in history:
            messages += [{"role": "user", "content": question},
                         {"role": "assistant", "content": answer}]
        messages.append({"role": "user", "content": body["prompt"]})
        inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                               return_tensors="pt", return_dict=True)
        temperature = float(body.get("temperature", 0.0))
        sampling = ({"do_sample": True, "temperature": temperature, "top_p": float(body.get("top_p", 1.0))}
                    if temperature > 0 else {"do_sample": False})
        with torch.inference_mode():
            output = model.generate(**inputs, max_length=int(body.get("max_length", 2048)),
                                    pad_token_id=tokenizer.eos_token_id, **sampling)
        response = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        return {"response": response, "history": [*history, [body["prompt"], response]],
                "status": 200, "time": datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")}

    return app


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8100)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    folder = weights_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE).eval()
    uvicorn.run(create_app(model, tokenizer), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
