"""What the two engine-contract suites share: the adapter shape, the prompts, the reference
(transformers + PEFT) and the learner's log-probs. tests/actors/test_engine_contract.py holds the
engines to it exactly in fp32 on the CPU; tests/actors/test_engine_contract_cuda.py within
bounds in bf16 on a GPU."""

from __future__ import annotations

import torch

from rl.config import load_config
from rl.records import Prompt, SamplingParams

TARGETS = ("q_proj", "v_proj", "down_proj")  # three of seven: vLLM's packed q/k/v and gate/up in play
LORA = ["lora.rank=8", "lora.alpha=24", f"lora.target_modules=[{', '.join(TARGETS)}]"]
# > 128 tokens: with vLLM the prompts fill a whole KV block, so its prefix cache is in play
SYSTEM = "You check arithmetic. Read the expression, then answer with one number. " * 9
QUESTIONS = ["Expression: 7 θ 5 | API answer: 12 →", "Expression: 9 γ 3 | API answer: 24 →", "What is 17 * 23?"]
GREEDY = SamplingParams(max_new_tokens=8, temperature=0.0)
SAMPLED = SamplingParams(max_new_tokens=8, temperature=0.8, seed=11)


def engine_config(engine: str, *extra: str):
    """The config an engine named ``hf``, ``vllm`` or ``vllm-merged`` is built from."""
    kind, _, mode = engine.partition("-")
    modes = [f"rollout.vllm_adapter_mode={mode}"] if mode else []
    return load_config(None, [f"rollout.engine={kind}", *modes, "rollout.temperature=0.8",
                              "rollout.max_new_tokens=16", "rollout.max_prompt_tokens=512",
                              "eval.max_new_tokens=16", *LORA, *extra])


def render_prompts(tokenizer) -> list[Prompt]:
    def render(question):
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return Prompt(tokenizer(text, add_special_tokens=False)["input_ids"], text)

    return [render(q) for q in QUESTIONS]


def reference_model(dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """transformers + PEFT with the configured LoRA: what every engine must reproduce."""
    from peft import LoraConfig, get_peft_model

    from actors.models import load_causal_lm

    base = load_causal_lm("embedded", dtype=dtype, device=device)
    return get_peft_model(base, LoraConfig(r=8, lora_alpha=24, target_modules=list(TARGETS),
                                           task_type="CAUSAL_LM")).to(device).eval()


def random_versions(reference, count: int) -> list[dict[str, torch.Tensor]]:
    """``count`` random adapters (B non-zero, so each changes what the model says), fp32 on the
    CPU as the learner exports them."""
    from peft import get_peft_model_state_dict

    shapes = {k: v.shape for k, v in get_peft_model_state_dict(reference).items()}
    gen = torch.Generator().manual_seed(0)
    return [{k: torch.randn(s, generator=gen) * 0.05 for k, s in shapes.items()} for _ in range(count)]


def set_adapter(reference, tensors) -> None:
    from peft import set_peft_model_state_dict

    set_peft_model_state_dict(reference, tensors)


def lora_shapes(reference) -> dict[str, tuple[int, ...]]:
    from peft import get_peft_model_state_dict

    return {k: tuple(v.shape) for k, v in get_peft_model_state_dict(reference).items()}


def learner_logprobs(reference, prompt: Prompt, completions, temperature: float, device: str = "cpu"):
    """What the learner computes for these tokens (actors/learner.py's two functions), on the CPU."""
    from actors.shared_prefix import RowBatch, completion_logits
    from rl.grpo import token_logprobs

    batch = RowBatch.build([prompt.token_ids], [0] * len(completions), completions)
    tokens, _ = batch.completion_tokens(device, 0)
    with torch.no_grad():
        return token_logprobs(completion_logits(reference, batch, 0, True), tokens, temperature).float().cpu()
