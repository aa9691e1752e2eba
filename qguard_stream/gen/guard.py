"""GenGuard: Qwen3Guard-Gen moderation of a whole prompt or response by greedy generation.

The checkpoint's own chat template (from its tokenizer config) renders the safety-policy prompt;
greedy decoding on our KV cache writes `Safety: ... / Categories: ... / Refusal: ...`, which
parse.py turns into a GenVerdict. This module owns loading a Qwen3ForCausalLM checkpoint and the
conversation -> ids -> text path; it must not interpret verdicts beyond the parser.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from qguard_stream.config import GuardConfig, read_config_json
from qguard_stream.gen.causal_lm import CausalLM
from qguard_stream.gen.decode import Decoder
from qguard_stream.gen.parse import GenVerdict, parse_gen_output
from qguard_stream.loader import (
    CheckpointError,
    default_dtype,
    fill_model,
    load_tokenizer,
    resolve_checkpoint,
)
from qguard_stream.template import validate_messages

Messages = list[dict[str, str]]
EosIds = int | Sequence[int] | None


class GenGuard:
    """A Qwen3Guard-Gen model: moderate prompts and responses by generating a verdict."""

    def __init__(self, lm: CausalLM, tokenizer: Any, eos_token_ids: Sequence[int] = (),
                 kv_memory_gb: float | None = None) -> None:
        """`kv_memory_gb`: the decoding KV pool (default 2 GiB on CUDA, 4 on the CPU, committed
        there only as used); sequences wait for room in it (see gen/decode.py)."""
        if tokenizer is None:
            raise CheckpointError("a Gen checkpoint needs its tokenizer files (none were found)")
        if not getattr(tokenizer, "chat_template", None):
            raise CheckpointError(
                "the checkpoint's tokenizer config has no chat_template; Qwen3Guard-Gen's "
                "safety-policy prompt lives there, so it cannot be moderated without it"
            )
        self.lm, self.tokenizer = lm, tokenizer
        self.config: GuardConfig = lm.config
        im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        ids = [*eos_token_ids, *([im_end] if isinstance(im_end, int) else [])]
        self.stop_ids = frozenset(i for i in ids if i is not None)
        self.decoder = Decoder(lm, kv_memory_gb)

    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike[str],
                        device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None,
                        kv_memory_gb: float | None = None,
                        check_finite: bool = True) -> GenGuard:
        """Load a Qwen3ForCausalLM checkpoint directory or hub id (bf16 on CUDA, fp32 on CPU);
        `kv_memory_gb` as in the constructor; `check_finite` as StreamGuard.from_pretrained's."""
        directory = resolve_checkpoint(path_or_id)
        raw = read_config_json(directory / "config.json")
        target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        with torch.device("meta"):
            lm = CausalLM(backbone_config(raw))
        fill_model(lm, directory, target, dtype or default_dtype(target), check_finite)
        lm.tie_weights()
        return cls(lm, load_tokenizer(directory), _eos_list(raw.get("eos_token_id")),
                   kv_memory_gb)

    # ---- decoding -------------------------------------------------------------------------
    def generate_ids(self, token_ids: Sequence[int], max_new_tokens: int = 128,
                     eos_token_id: EosIds = None) -> list[int]:
        """Greedy continuation of token_ids; stops after an eos id (included in the result)."""
        return self.generate_ids_batch([token_ids], max_new_tokens, eos_token_id)[0]

    def generate_ids_batch(self, batch: Sequence[Sequence[int]], max_new_tokens: int = 128,
                           eos_token_id: EosIds = None) -> list[list[int]]:
        """generate_ids for many sequences decoded together (continuous batching on the paged
        runner, see gen/decode.py); each row equals its single-sequence result."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) \
                or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        prompts = [self._check_ids(ids, row) for row, ids in enumerate(batch)]
        if not prompts:
            return []
        stop = self.stop_ids if eos_token_id is None else frozenset(_eos_list(eos_token_id))
        return self.decoder.generate(prompts, max_new_tokens, stop)

    def _check_ids(self, token_ids: Sequence[int], row: int) -> list[int]:
        ids = token_ids.tolist() if isinstance(token_ids, torch.Tensor) else list(token_ids)
        if not ids:
            raise ValueError(f"sequence {row} is empty: nothing to continue")
        for value in ids:
            if isinstance(value, bool) or not isinstance(value, int) \
                    or not 0 <= value < self.config.vocab_size:
                raise ValueError(f"sequence {row}: token id {value!r} is not an int in "
                                 f"[0, {self.config.vocab_size})")
        if len(ids) >= self.config.max_position_embeddings:
            raise ValueError(f"sequence {row} has {len(ids)} tokens: no room to generate within "
                             f"max_position_embeddings={self.config.max_position_embeddings}")
        return ids

    # ---- moderation -----------------------------------------------------------------------
    def render(self, messages: Messages) -> list[int]:
        """The checkpoint's chat template applied to messages (as the model card does), as ids."""
        text = self.tokenizer.apply_chat_template(validate_messages(messages), tokenize=False)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def moderate_prompt(self, prompt: str, max_new_tokens: int = 128) -> GenVerdict:
        """Moderate a user prompt."""
        return self.moderate_batch([_conversation(prompt, None)], max_new_tokens)[0]

    def moderate_response(self, prompt: str, response: str,
                          max_new_tokens: int = 128) -> GenVerdict:
        """Moderate an assistant response to prompt (also reports whether it is a refusal)."""
        return self.moderate_batch([_conversation(prompt, response)], max_new_tokens)[0]

    def moderate_batch(self, conversations: Sequence[Messages],
                       max_new_tokens: int = 128) -> list[GenVerdict]:
        """Moderate many conversations together; each is judged on its last message (a response
        when the last message is the assistant's, else a prompt)."""
        if not conversations:
            return []
        prompts = [self.render(messages) for messages in conversations]
        outputs = self.generate_ids_batch(prompts, max_new_tokens)
        return [self._verdict(messages, ids) for messages, ids in zip(conversations, outputs)]

    def _verdict(self, messages: Messages, generated: list[int]) -> GenVerdict:
        kind = "response" if messages[-1]["role"] == "assistant" else "prompt"
        text = self.tokenizer.decode(generated, skip_special_tokens=True)
        return parse_gen_output(text, kind)


def _conversation(prompt: str, response: str | None) -> Messages:
    for name, value in (("prompt", prompt), ("response", response)):
        if value is not None and not isinstance(value, str):
            raise TypeError(f"{name} must be a str, got {type(value).__name__}")
    messages = [{"role": "user", "content": prompt}]
    if response is not None:
        messages.append({"role": "assistant", "content": response})
    return messages


def backbone_config(raw: dict[str, Any]) -> GuardConfig:
    """The backbone shape of a Qwen3ForCausalLM config.json. Gen checkpoints have no guard heads;
    guard_inner_size is filled with a placeholder the causal LM never reads."""
    if "Qwen3ForGuardModel" in (raw.get("architectures") or []):
        raise CheckpointError("this is a Qwen3Guard-Stream checkpoint (Qwen3ForGuardModel); "
                              "load it with StreamGuard, not GenGuard")
    return GuardConfig.from_dict({**raw, "guard_inner_size": raw.get("guard_inner_size", 1)})


def _eos_list(value: EosIds) -> list[int]:
    if value is None:
        return []
    values = [value] if isinstance(value, int) else list(value)
    for item in values:
        if isinstance(item, bool) or not isinstance(item, int):
            raise TypeError(f"eos_token_id must be an int or a list of ints, got {value!r}")
    return values
