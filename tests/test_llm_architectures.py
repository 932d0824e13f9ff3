"""Every architecture the engine runs, from a checkpoint folder, against transformers' generate().

Each model is tiny and random (fixed seed), written to a temporary folder as a
config.json and safetensors weights, and read back the way the server reads a
model: its config alone says what to run. Every norm weight is perturbed so that
a norm missing, misplaced or missing Gemma's ``1 + w`` changes the tokens; the
weights are wider than transformers' default and the head untied, so that greedy
tokens vary and the soft-caps bite. Sliding windows are 10 tokens and the
prompts up to 50, and the test first shows that HF's own tokens change without
the window, so an engine ignoring it cannot pass.

Through the engine, several sequences of different lengths run together with a
small prefill budget (long prompts prefilled in chunks, also across a window),
then a second turn reuses the first one's KV from the prefix cache. Quantized
weights are checked against their dequantized model (test_llm_quantization's
tolerance), a vision-language Gemma 3 checkpoint runs as its text decoder, other
multimodal configs are refused by name, and a real server serves two of these
folders through the OpenAI API.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from transformers import (AutoConfig, GemmaConfig, GemmaForCausalLM, Gemma2Config, Gemma2ForCausalLM, Gemma3Config, Gemma3ForCausalLM,
                          Gemma3ForConditionalGeneration, Gemma3TextConfig, GenerationConfig, Glm4Config,
                          Glm4ForCausalLM, GlmConfig, GlmForCausalLM, LlamaConfig, LlamaForCausalLM, LlavaConfig,
                          MistralConfig, MistralForCausalLM, Phi3Config, Phi3ForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM, SmolLM3Config, SmolLM3ForCausalLM)

from serverproc import ServerProcess
from test_llm_engine import TINY, hf_greedy, make_engine, model, submit  # noqa: F401 (fixtures)
from test_llm_quantization import assert_logits_close, dequantized_reference
from triserve.backends.llm.engine import EngineConfig, LLMEngine
from triserve.backends.llm.loader import LLMSettings, load_model
from triserve.backends.llm.quantization import Int4Weight, Int8Weight, quantize
from triserve.backends.llm.weights import ModelSource, SafetensorsWeights

WINDOW = 10
HEAD = dict(head_dim=16)  # Gemma and GLM default to 128/256-wide heads
ARCHITECTURES = {
    "llama": (LlamaForCausalLM, LlamaConfig, {}),
    "mistral": (MistralForCausalLM, MistralConfig, dict(sliding_window=WINDOW)),  # every layer
    "qwen2": (Qwen2ForCausalLM, Qwen2Config, {}),
    # layers from max_window_layers on slide: layer 0 full, layer 1 sliding
    "qwen2-sliding": (Qwen2ForCausalLM, Qwen2Config, dict(use_sliding_window=True, sliding_window=WINDOW,
                                                          max_window_layers=1)),
    "qwen3": (Qwen3ForCausalLM, Qwen3Config, {}),
    "phi3": (Phi3ForCausalLM, Phi3Config, dict(partial_rotary_factor=0.5)),
    "smollm3": (SmolLM3ForCausalLM, SmolLM3Config, dict(no_rope_layer_interval=2)),  # layer 1 without rope
    "gemma": (GemmaForCausalLM, GemmaConfig, dict(**HEAD)),
    # layer types alternate sliding / full by default; soft-caps small enough to bite
    "gemma2": (Gemma2ForCausalLM, Gemma2Config, dict(**HEAD, query_pre_attn_scalar=24, sliding_window=WINDOW,
                                                     attn_logit_softcapping=3.0, final_logit_softcapping=2.0)),
    # the older config form: sliding_window_pattern 2 gives layers sliding, full; local and
    # global rope bases differ (10k, 1M)
    "gemma3": (Gemma3ForCausalLM, Gemma3TextConfig, dict(**HEAD, query_pre_attn_scalar=24, sliding_window=WINDOW,
                                                         sliding_window_pattern=2)),
    "glm": (GlmForCausalLM, GlmConfig, dict(**HEAD)),  # rotary on half of each head, interleaved
    "glm4": (Glm4ForCausalLM, Glm4Config, dict(**HEAD)),
}
PROMPTS = [[1, 2, 3], list(range(5, 40)), [(7 * i) % 256 for i in range(50)], [9, 8, 7, 6, 5, 4, 3, 2]]


def random_model(name: str, tied: bool = False, spread: float = 0.15) -> torch.nn.Module:
    """A tiny random model of the architecture, the same on every run, that generates past any EOS.
    Untied, and with weights of std ``spread``, its greedy tokens vary (a tied random Gemma with
    wide weights repeats its last token)."""
    model_class, config_class, overrides = ARCHITECTURES[name]
    torch.manual_seed(0)
    config = config_class(**TINY, **overrides, initializer_range=spread, pad_token_id=0, tie_word_embeddings=tied)
    model = model_class(config).eval()
    with torch.no_grad():
        for parameter_name, parameter in model.named_parameters():
            if "norm" in parameter_name:
                parameter.add_(0.3 * torch.randn_like(parameter))
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def saved(model: torch.nn.Module, folder) -> ModelSource:
    """The model written as a checkpoint folder and read back as the loader does (config.json
    and safetensors, one tensor at a time)."""
    model.save_pretrained(folder)
    config = AutoConfig.from_pretrained(folder)
    return ModelSource(config, SafetensorsWeights(folder), GenerationConfig.from_model_config(config))


def without_window(model: torch.nn.Module) -> torch.nn.Module:
    """The same model (the same layer types, so the same rope bases) with windows longer than any
    sequence here."""
    config = copy.deepcopy(model.config)
    config.sliding_window = 4096
    other = type(model)(config).eval()
    other.load_state_dict(model.state_dict())
    other.generation_config = model.generation_config
    return other


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_architecture_equals_hf_generate_batched_and_from_the_prefix_cache(tmp_path, make_engine, name):
    model = random_model(name)
    expected = [hf_greedy(model, prompt, 12) for prompt in PROMPTS]
    if getattr(model.config, "sliding_window", None):
        full = without_window(model)
        assert any(hf_greedy(full, prompt, 12) != tokens for prompt, tokens in zip(PROMPTS, expected)), \
            "the window changes nothing here: the test would not notice an engine ignoring it"
    engine = make_engine(saved(model, tmp_path / name), max_model_len=128, max_num_seqs=4, max_prefill_tokens=16)
    assert engine.runner.architecture == ARCHITECTURES[name][0].__name__
    collectors = [submit(engine, f"r{i}", prompt) for i, prompt in enumerate(PROMPTS)]
    for prompt, tokens, collector in zip(PROMPTS, expected, collectors):
        assert collector.final.finish_reason == "length"
        assert collector.tokens == tokens, f"{name}: prompt of {len(prompt)} tokens"

    conversation = PROMPTS[2] + expected[2] + [11, 12, 13]  # the next turn of the longest one
    hits = engine.stats()["prefix_cache_hits"]
    turn2 = submit(engine, "turn2", conversation)
    assert turn2.final.cached_tokens == len(PROMPTS[2]) + 12 - 1
    assert engine.stats()["prefix_cache_hits"] == hits + 1
    assert turn2.tokens == hf_greedy(model, conversation, 12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the GPU path runs where torch sees one")
@pytest.mark.parametrize("name", ["gemma2", "gemma3", "glm4"])
def test_architecture_on_a_gpu_equals_hf_generate(tmp_path, make_engine, name):
    """Windows, soft-caps, both rope bases and the reordered GLM rows on the GPU (float32; HF on the CPU)."""
    model = random_model(name)
    engine = make_engine(saved(model, tmp_path / name), max_model_len=128, max_num_seqs=4, max_prefill_tokens=16,
                         device="cuda:0")
    collectors = [submit(engine, f"g{i}", prompt) for i, prompt in enumerate(PROMPTS)]
    for prompt, collector in zip(PROMPTS, collectors):
        assert collector.final and collector.tokens == hf_greedy(model, prompt, 12)


@pytest.mark.parametrize("name,quantization", [("gemma2", "int8"), ("gemma2", "int4"), ("glm4", "int4")])
def test_quantized_architecture_computes_its_dequantized_model(name, quantization):
    """int8/int4 weights of a Gemma 2 (soft-caps, windows, 1 + w norms) and a GLM-4 (rows
    reordered for its interleaved partial rotary) against the same model with the dequantized
    weights, run by transformers: within test_llm_quantization's LOGIT_TOLERANCE of the logits'
    range, over a prompt longer than the window."""
    model = random_model(name, tied=True, spread=0.05)  # tied: the quantized embedding is the head
    engine = LLMEngine(model, EngineConfig(max_model_len=128, quantization=quantization))
    held = {key: quantize(tensor, quantization) if key.endswith("_proj.weight") else tensor
            for key, tensor in model.state_dict().items() if key != "lm_head.weight"}
    held["model.embed_tokens.weight"] = Int8Weight.quantize(held["model.embed_tokens.weight"])
    kind = Int4Weight if quantization == "int4" else Int8Weight
    assert all(isinstance(w, kind) for key, w in held.items() if key.endswith("_proj.weight"))
    assert_logits_close(engine, dequantized_reference(model, held), PROMPTS[2])


def test_gemma3_vision_language_checkpoint_runs_its_text_decoder(tmp_path, make_engine):
    """Gemma 3 4B and larger are Gemma3ForConditionalGeneration: the engine runs their text
    decoder from the checkpoint (the vision tower's weights are never read) and answers text
    prompts as transformers' whole model does."""
    torch.manual_seed(0)
    text = dict(**TINY, **ARCHITECTURES["gemma3"][2], initializer_range=0.15, pad_token_id=0)
    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, image_size=28, patch_size=14)
    model = Gemma3ForConditionalGeneration(Gemma3Config(text_config=text, vision_config=vision,
                                                        mm_tokens_per_image=4)).eval()
    with torch.no_grad():
        for parameter_name, parameter in model.named_parameters():
            if "language_model" in parameter_name and "norm" in parameter_name:
                parameter.add_(0.3 * torch.randn_like(parameter))
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    engine = make_engine(saved(model, tmp_path), max_model_len=128, max_num_seqs=4, max_prefill_tokens=16)
    assert engine.runner.architecture == "Gemma3ForConditionalGeneration"
    collectors = [submit(engine, f"r{i}", prompt) for i, prompt in enumerate(PROMPTS[1:3])]
    for prompt, collector in zip(PROMPTS[1:3], collectors):
        assert collector.final and collector.tokens == hf_greedy(model, prompt, 12)


def test_an_architecture_the_engine_cannot_run_is_refused_at_load_by_name(tmp_path):
    """A vision-language model without a text-only path (Llava) is refused from its config,
    before any weight is read."""
    config = LlavaConfig()
    config.architectures = ["LlavaForConditionalGeneration"]
    config.save_pretrained(tmp_path)
    settings = LLMSettings(tmp_path, EngineConfig(max_model_len=64))
    with pytest.raises(ValueError, match="does not support the architecture 'LlavaForConditionalGeneration'"):
        load_model(settings, logging.getLogger("test"))


SERVED = ("gemma2", "glm4")
TEMPLATE = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}assistant:"


def byte_tokenizer():
    """A byte-level tokenizer for the tiny vocabulary, one byte per token: token ``b`` is byte ``b``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    pieces = Tokenizer(models.BPE({char: byte for byte, char in bytes_to_unicode().items()}, []))
    pieces.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    pieces.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=pieces, chat_template=TEMPLATE)


@pytest.fixture(scope="module")
def architecture_server(tmp_path_factory):
    """A real server whose repository holds a Gemma 2 and a GLM-4 checkpoint folder (config.json,
    safetensors, tokenizer) served by the llm backend, as a user would lay them out."""
    repository = tmp_path_factory.mktemp("architectures")
    tokenizer = byte_tokenizer()
    for name in SERVED:
        checkpoint = repository / name / "1"  # the version folder holds the checkpoint
        random_model(name).save_pretrained(checkpoint)
        tokenizer.save_pretrained(checkpoint)
        settings = dict(model="1", dtype="float32", max_model_len="128", max_num_seqs="4",
                        kv_cache_mb="8", max_prefill_tokens="16")
        (repository / name / "config.pbtxt").write_text(
            f'name: "{name}"\nbackend: "llm"\nmax_batch_size: 0\n' + "".join(
                f'parameters: {{ key: "{key}", value: {{ string_value: "{value}" }} }}\n'
                for key, value in settings.items()))
    with ServerProcess(repository, ready_timeout=90) as server:
        yield server


@pytest.mark.parametrize("name", SERVED)
def test_a_checkpoint_folder_is_served_and_answers_as_hf_generate(architecture_server, name):
    """Through the OpenAI API, greedy: the reply's tokens (their bytes, from logprobs) are
    transformers' for the same rendered prompt, which is longer than the Gemma 2 window."""
    import openai

    messages = [{"role": "user", "content": "Tell me about sliding windows, soft caps and rotary layouts."}]
    prompt = byte_tokenizer().apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    expected = hf_greedy(random_model(name), prompt, 12)
    with openai.OpenAI(base_url=f"{architecture_server.base_url}/v1", api_key="unused", max_retries=0,
                       timeout=60) as client:
        reply = client.chat.completions.create(model=name, messages=messages, max_tokens=12, temperature=0,
                                               logprobs=True)
    assert reply.usage.prompt_tokens == len(prompt) and reply.usage.completion_tokens == 12
    assert [entry.bytes for entry in reply.choices[0].logprobs.content] == [[token] for token in expected]
