"""Turn task examples into padded token batches with answer masks built from lengths.

Prompt and answer are tokenized separately and concatenated, so the answer's
tokens are known exactly. Masks come from lengths, never from the pad id:
SmolLM2's pad token is its EOS, and masking by pad id would silently stop EOS
from being trained. Right padding for training and scoring.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Sequence:
    ids: list[int]
    answer_start: int  # ids[answer_start:] are the answer tokens


def encode(tokenizer, prompt: str, answer: str, max_length: int, add_eos: bool = False) -> Sequence:
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    if add_eos and tokenizer.eos_token_id is not None:
        answer_ids = answer_ids + [tokenizer.eos_token_id]
    if not answer_ids:
        raise ValueError(f"answer {answer!r} tokenizes to nothing; every example needs a non-empty answer")
    answer_ids = answer_ids[: max_length - 1]
    prompt_ids = prompt_ids[-(max_length - len(answer_ids)):]  # keep the end of a long prompt
    return Sequence(prompt_ids + answer_ids, len(prompt_ids))


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    answer_mask: torch.Tensor  # [B, T] True where ids[t] is an answer token (t >= 1)

    def to(self, device) -> "Batch":
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.answer_mask.to(device))


def collate(seqs: list[Sequence], pad_id: int) -> Batch:
    width = max(len(s.ids) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    answer = torch.zeros((len(seqs), width), dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, : len(s.ids)] = torch.tensor(s.ids)
        attn[i, : len(s.ids)] = 1
        answer[i, max(s.answer_start, 1): len(s.ids)] = True
    return Batch(ids, attn, answer)


def encode_examples(tokenizer, examples, max_length: int) -> list:
    """SFT examples -> [Sequence]; preference examples -> [(chosen Sequence, rejected Sequence)]."""
    out = []
    for ex in examples:
        if hasattr(ex, "chosen"):
            out.append((encode(tokenizer, ex.prompt, ex.chosen, max_length),
                        encode(tokenizer, ex.prompt, ex.rejected, max_length)))
        else:
            out.append(encode(tokenizer, ex.prompt, ex.completion, max_length, add_eos=True))
    return out


def batch_items(items: list, pad_id: int) -> Batch:
    """Collate SFT sequences, or preference pairs as [chosen..., rejected...]."""
    if isinstance(items[0], tuple):
        return collate([c for c, _ in items] + [r for _, r in items], pad_id)
    return collate(items, pad_id)
