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
    attention mask: transformers then lets each token attend only within its own sequence. Rows whose
    preference pairs share their prompt (`pack(..., share_prompts=True)`) also carry `group`/`branch`, from
    which `tree_attention_mask` builds the mask for the model at hand."""

    input_ids: torch.Tensor  # [R, T]
    attention_mask: torch.Tensor | None  # [R, T] 1 = real token; None when packed
    answer_mask: torch.Tensor  # [R, T] True where ids[t] is an answer token (never a sequence's first token)
    sequence: torch.Tensor  # [R, T] which input sequence each token belongs to (-1: padding)
    num_sequences: int
    # per input sequence: (row, start, length, skip): its tokens [skip:] sit at row[start: start + length]
    # (skip > 0: its first `skip` tokens are a prompt it shares with the sequence placed just before it)
    slots: list[tuple[int, int, int, int]]
    position_ids: torch.Tensor | None = None  # [R, T] when packed
    predictor: torch.Tensor | None = None  # [R, T] the column whose state predicts each token (default: t - 1)
    group: torch.Tensor | None = None  # [R, T] the span a token belongs to (-1: padding), when prompts are shared
    branch: torch.Tensor | None = None  # [R, T] -1: the span's shared prompt, b: the span's b-th answer

    def to(self, device) -> "Batch":
        move = (lambda t: None if t is None else t.to(device))
        return Batch(move(self.input_ids), move(self.attention_mask), move(self.answer_mask), move(self.sequence),
                     self.num_sequences, self.slots, move(self.position_ids), move(self.predictor),
                     move(self.group), move(self.branch))

    def answer_positions(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rows, state columns, token columns) of every answer token: the state at (row, state column)
        predicts the token at (row, token column)."""
        rows, cols = self.answer_mask.nonzero(as_tuple=True)
        states = self.predictor[rows, cols] if self.predictor is not None else cols - 1
        return rows, states, cols


def _fill(seqs: list[Sequence], slots: list[tuple[int, int, int, int]], rows: int, width: int, pad_id: int,
          packed: bool, units: list[list[int]] | None = None) -> Batch:
    ids = torch.full((rows, width), pad_id, dtype=torch.long)
    answer = torch.zeros((rows, width), dtype=torch.bool)
    sequence = torch.full((rows, width), -1, dtype=torch.long)
    positions = torch.arange(width).repeat(rows, 1) if packed else None
    for i, (s, (row, start, length, skip)) in enumerate(zip(seqs, slots)):
        ids[row, start: start + length] = torch.tensor(s.ids[skip:])
        first_answer = max(s.answer_start, 1)
        answer[row, start + max(first_answer - skip, 0): start + length] = True
        sequence[row, start: start + length] = i
        if packed:
            positions[row, start: start + length] = torch.arange(skip, skip + length)
    if packed:  # padding after the last sequence of a row restarts at 0, so it is a sequence of its own
        for row in range(rows):
            end = max((start + length for r, start, length, _ in slots if r == row), default=0)
            positions[row, end:] = torch.arange(width - end)
    attention = None if packed else (sequence >= 0).long()
    batch = Batch(ids, attention, answer, sequence, len(seqs), slots, positions)
    if units is not None and any(len(unit) > 1 for unit in units):
        batch.predictor = torch.arange(width).repeat(rows, 1) - 1
        batch.group = torch.full((rows, width), -1, dtype=torch.long)
        batch.branch = torch.full((rows, width), -1, dtype=torch.long)
        for g, unit in enumerate(units):
            row, trunk_start, _, _ = slots[unit[0]]
            for b, i in enumerate(unit):
                _, start, length, skip = slots[i]
                batch.group[row, start: start + length] = g
                batch.branch[row, start: start + length] = b
                if skip:  # its first own token is predicted by the shared prompt's last state
                    batch.predictor[row, start] = trunk_start + skip - 1
            shared = slots[unit[1]][3] if len(unit) > 1 else 0
            batch.branch[row, trunk_start: trunk_start + shared] = -1
    return batch


def collate(seqs: list[Sequence], pad_id: int) -> Batch:
    """One sequence per row, right-padded to the longest."""
    width = max(len(s.ids) for s in seqs)
    return _fill(seqs, [(i, 0, len(s.ids), 0) for i, s in enumerate(seqs)], len(seqs), width, pad_id, packed=False)


def _shares_prompt(chosen: Sequence, rejected: Sequence) -> bool:
    p = chosen.answer_start
    return p >= 1 and rejected.answer_start == p and chosen.ids[:p] == rejected.ids[:p]


def pack(seqs: list[Sequence], pad_id: int, share_prompts: bool = False) -> Batch:
    """Several sequences per row (first fit, longest first, rows up to twice the longest span), so a batch
    of short and long sequences wastes little on padding; attention stays within each sequence.

    share_prompts: `seqs` are preference pairs laid out [chosen..., rejected...]; a pair whose two sequences
    start with the same prompt runs it once, as one span [prompt, chosen answer, rejected answer] in which the
    rejected answer sees the prompt but not the chosen answer, its positions restarting after the prompt
    (Batch.group/branch; the mask comes from tree_attention_mask). A DPO step then computes each prompt
    token once instead of twice."""
    n = len(seqs) // 2
    units = [[i] for i in range(len(seqs))]
    if share_prompts:
        units = [[i, n + i] if _shares_prompt(seqs[i], seqs[n + i]) else [i] for i in range(n)]
        units += [[n + i] for i in range(n) if len(units[i]) == 1]
    skips = {i: 0 for i in range(len(seqs))}
    for unit in units:
        if len(unit) > 1:
            skips[unit[1]] = seqs[unit[0]].answer_start
    sizes = [sum(len(seqs[i].ids) - skips[i] for i in unit) for unit in units]
    capacity = 2 * max(sizes)
    fill: list[int] = []
    slots: list = [None] * len(seqs)
    for u in sorted(range(len(units)), key=lambda u: -sizes[u]):
        row = next((r for r, used in enumerate(fill) if used + sizes[u] <= capacity), len(fill))
        if row == len(fill):
            fill.append(0)
        for i in units[u]:
            length = len(seqs[i].ids) - skips[i]
            slots[i] = (row, fill[row], length, skips[i])
            fill[row] += length
    return _fill(seqs, slots, len(fill), max(fill), pad_id, packed=True, units=units if share_prompts else None)


def sliding_window(config) -> int | None:
    """The sliding window of a model whose layers (some or all) use one, else None."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    return None if types is not None and "sliding_attention" not in types else window


def tree_attention_mask(group: torch.Tensor, branch: torch.Tensor, positions: torch.Tensor, config, dtype,
                        prefix: int = 0) -> torch.Tensor | dict:
    """Additive attention mask [R, 1, T, prefix + T] for rows of spans that share a trunk (a prompt, branch -1)
    and fork into branches (answers): a query sees a key of its own span (group) that is not after it and lies
    on the trunk or on the query's own branch; every query sees the `prefix` columns (a KV cache all rows
    share) and itself (a padding query, group -1, nothing else). Models with sliding-window layers get
    {layer type: mask}, the window applied by position."""
    rows, width = group.shape
    t = torch.arange(width, device=group.device)
    q_group, k_group = group[:, :, None], group[:, None, :]
    q_branch, k_branch = branch[:, :, None], branch[:, None, :]
    own = ((t[None, :, None] >= t[None, None, :]) & (q_group == k_group) & (k_group >= 0)
           & ((k_branch == -1) | (k_branch == q_branch)))
    own |= torch.eye(width, dtype=torch.bool, device=group.device)[None]
    allowed = torch.cat([torch.ones((rows, width, prefix), dtype=torch.bool, device=group.device), own], 2)
    key_pos = torch.cat([torch.arange(prefix, device=group.device).expand(rows, -1), positions], 1)
    window = sliding_window(config)
    if window is None:
        masks = {"full_attention": allowed}
    else:
        sliding = allowed & (positions[:, :, None] - key_pos[:, None, :] < window)
        masks = {"full_attention": allowed, "sliding_attention": sliding} if getattr(config, "layer_types", None) \
            else {"sliding_attention": sliding}  # no layer types (Mistral): every layer slides
    floats = {name: torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(~m, torch.finfo(dtype).min)[:, None]
              for name, m in masks.items()}
    return floats if len(floats) > 1 else next(iter(floats.values()))


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


def count_truncated(tokenizer, examples, max_length: int) -> int:
    """How many training examples `encode` cuts to max_length (a DPO pair counts once, if either side is cut)."""
    def cut(prompt: str, answer: str, eos: bool) -> bool:
        n = len(tokenizer(prompt, add_special_tokens=True)["input_ids"])
        n += len(tokenizer(answer, add_special_tokens=False)["input_ids"]) + int(eos and tokenizer.eos_token_id is not None)
        return n > max_length

    if examples and hasattr(examples[0], "chosen"):
        return sum(cut(ex.prompt, ex.chosen, False) or cut(ex.prompt, ex.rejected, False) for ex in examples)
    return sum(cut(ex.prompt, ex.completion, True) for ex in examples)


def truncation_note(truncated: int, total: int) -> str | None:
    """A warning when more than 1% of the training examples are cut, naming the field that sets the length."""
    if total and truncated / total > 0.01:
        return (f"{truncated} of {total} training examples ({truncated / total:.0%}) are longer than "
                f"training.max_length and are cut from the left of the prompt; raise training.max_length to keep them")
    return None


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


def batch_items(items: list, pad_id: int, packed: bool = False, share_prompts: bool = True) -> Batch:
    """Collate (or pack) SFT sequences, or preference pairs as [chosen..., rejected...]; packed pairs run each
    shared prompt once unless share_prompts is False."""
    pairs = isinstance(items[0], tuple)
    seqs = [c for c, _ in items] + [r for _, r in items] if pairs else items
    return pack(seqs, pad_id, share_prompts=pairs and share_prompts) if packed else collate(seqs, pad_id)
