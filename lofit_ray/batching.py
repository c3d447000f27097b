"""Turn task examples into token batches (padded or packed) with answer masks built from lengths.

Prompt and answer are tokenized separately and concatenated, so the answer's
tokens are known exactly. Masks come from lengths, never from the pad id:
SmolLM2's pad token is its EOS, and masking by pad id would silently stop EOS
from being trained. Training steps pack several sequences into each row (about a
third of a padded DPO batch was padding); scoring right-pads one sequence per row.
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
    """Token ids in rows, either one sequence per row, right-padded (`collate`), or several sequences packed
    into each row (`pack`). Packed rows carry `position_ids` that restart at every sequence and no
    attention mask: transformers then lets each token attend only within its own sequence."""

    input_ids: torch.Tensor  # [R, T]
    attention_mask: torch.Tensor | None  # [R, T] 1 = real token; None when packed
    answer_mask: torch.Tensor  # [R, T] True where ids[t] is an answer token (never a sequence's first token)
    sequence: torch.Tensor  # [R, T] which input sequence each token belongs to (-1: padding)
    num_sequences: int
    slots: list[tuple[int, int, int]]  # per input sequence: (row, start, length)
    position_ids: torch.Tensor | None = None  # [R, T] when packed

    def to(self, device) -> "Batch":
        move = (lambda t: None if t is None else t.to(device))
        return Batch(move(self.input_ids), move(self.attention_mask), move(self.answer_mask), move(self.sequence),
                     self.num_sequences, self.slots, move(self.position_ids))


def _fill(seqs: list[Sequence], slots: list[tuple[int, int, int]], rows: int, width: int, pad_id: int,
          packed: bool) -> Batch:
    ids = torch.full((rows, width), pad_id, dtype=torch.long)
    answer = torch.zeros((rows, width), dtype=torch.bool)
    sequence = torch.full((rows, width), -1, dtype=torch.long)
    positions = torch.arange(width).repeat(rows, 1) if packed else None
    for i, (s, (row, start, length)) in enumerate(zip(seqs, slots)):
        ids[row, start: start + length] = torch.tensor(s.ids)
        answer[row, start + max(s.answer_start, 1): start + length] = True
        sequence[row, start: start + length] = i
        if packed:
            positions[row, start: start + length] = torch.arange(length)
    if packed:  # padding after the last sequence of a row restarts at 0, so it is a sequence of its own
        for row in range(rows):
            end = max((start + length for r, start, length in slots if r == row), default=0)
            positions[row, end:] = torch.arange(width - end)
    attention = None if packed else (sequence >= 0).long()
    return Batch(ids, attention, answer, sequence, len(seqs), slots, positions)


def collate(seqs: list[Sequence], pad_id: int) -> Batch:
    """One sequence per row, right-padded to the longest."""
    width = max(len(s.ids) for s in seqs)
    return _fill(seqs, [(i, 0, len(s.ids)) for i, s in enumerate(seqs)], len(seqs), width, pad_id, packed=False)


def pack(seqs: list[Sequence], pad_id: int) -> Batch:
    """Several sequences per row (first fit, longest first, rows up to twice the longest sequence), so a batch
    of short and long sequences wastes little on padding; attention stays within each sequence."""
    capacity = 2 * max(len(s.ids) for s in seqs)
    fill: list[int] = []
    slots: list = [None] * len(seqs)
    for i in sorted(range(len(seqs)), key=lambda i: -len(seqs[i].ids)):
        row = next((r for r, used in enumerate(fill) if used + len(seqs[i].ids) <= capacity), len(fill))
        if row == len(fill):
            fill.append(0)
        slots[i] = (row, fill[row], len(seqs[i].ids))
        fill[row] += len(seqs[i].ids)
    return _fill(seqs, slots, len(fill), max(fill), pad_id, packed=True)


def by_token_budget(lengths: list[int], budget: int) -> list[list[int]]:
    """Indices sorted by length, cut into groups whose rows x longest length stays within `budget` (a longer
    row gets a group of its own): batches of similar lengths waste little on padding."""
    groups, group = [], []
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        if group and (len(group) + 1) * lengths[i] > budget:
            groups.append(group)
            group = []
        group.append(i)
    return groups + [group] if group else groups


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


def batch_items(items: list, pad_id: int, packed: bool = False) -> Batch:
    """Collate (or pack) SFT sequences, or preference pairs as [chosen..., rejected...]."""
    seqs = [c for c, _ in items] + [r for _, r in items] if isinstance(items[0], tuple) else items
    return pack(seqs, pad_id) if packed else collate(seqs, pad_id)
