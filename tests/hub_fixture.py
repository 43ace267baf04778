"""A local directory shaped like the hub checkpoint a real run loads (Qwen/Qwen2.5-3B-Instruct), scaled down.

What a pretrained instruct checkpoint brings and the project's own tiny model does not:
- config.json of the Qwen2 architecture with Qwen2.5-3B-Instruct's structural fields (grouped-query attention,
  tied embeddings, rope theta 1e6, `torch_dtype` bfloat16, dropout fields at 0), only smaller;
- bf16 safetensors weights;
- generation_config.json with the instruct sampling defaults (do_sample, temperature 0.7, top_p 0.8, top_k 20,
  repetition_penalty 1.05) and TWO end tokens, <|im_end|> and <|endoftext|> (also the pad token);
- tokenizer files naming the `Qwen2Tokenizer` class, so AutoTokenizer takes the path a hub id takes, with
  a ChatML chat template that inserts a default system prompt when none is given.
Tests load it only through `engine.load_model` / `engine.load_tokenizer` with its path, as a hub id would be.
"""

import json
import os
import shutil

DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

# Qwen2.5's template, reduced to what matters here (no tool calls): a default system turn when none is given
QWEN_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM + "<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (message['role'] == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

SAMPLING_DEFAULTS = {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}


def build_hub_model(path: str, seed: int = 0) -> str:
    """Write the checkpoint directory at `path` (atomically) and return it."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    import common

    import toy

    if os.path.exists(os.path.join(path, "config.json")):
        return path
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 (151643, 151644, 151645 in Qwen)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [DEFAULT_SYSTEM, common.SYSTEM_PROMPT, r"\frac{1}{2} \sqrt{3} \boxed{5} x^2 + y^2 = z^2"]
    for row in toy.synthetic_problems(500, seed=seed):
        corpus += [row["question"], row["solution"], common.EXPLAIN_SENTENCE.format(answer=row["answer"])]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=600, special_tokens=specials,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        bos_token=None, model_max_length=32768)
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    endoftext, im_end = tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|im_end|>")

    config = Qwen2Config(  # Qwen2.5-3B-Instruct's fields: 36 layers, 2048 wide, 16 heads, 2 KV heads, 11008 MLP
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=32768, max_window_layers=2,
        rms_norm_eps=1e-6, rope_theta=1000000.0, sliding_window=32768, use_sliding_window=False,
        tie_word_embeddings=True, attention_dropout=0.0, hidden_act="silu", initializer_range=0.02,
        bos_token_id=endoftext, eos_token_id=im_end, use_cache=True, dtype="bfloat16",
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    with torch.no_grad():  # a little life in the weights, so sampled lengths vary and end tokens get sampled
        model.model.embed_tokens.weight.normal_(0, 0.5)
    model.generation_config = GenerationConfig(bos_token_id=endoftext, pad_token_id=endoftext,
                                               eos_token_id=[im_end, endoftext], **SAMPLING_DEFAULTS)
    tmp = f"{path}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    tok_config_path = os.path.join(tmp, "tokenizer_config.json")
    with open(tok_config_path) as f:
        tok_config = json.load(f)
    tok_config["tokenizer_class"] = "Qwen2Tokenizer"  # as on the hub: AutoTokenizer picks Qwen's class
    with open(tok_config_path, "w") as f:
        json.dump(tok_config, f, indent=2)
    os.replace(tmp, path)
    return path
