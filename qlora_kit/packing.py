"""Packing several training examples into one row, each attending only to itself.

SDPA does not keep packed examples apart through restarting position ids alone, so every
packed batch carries an explicit block-diagonal causal mask (batch, 1, length, length):
token t of an example sees only the earlier tokens of the same example. Padding positions
see themselves only (never a fully masked row, which would give NaN).
"""

from __future__ import annotations


def pack(lengths: list[int], max_length: int) -> list[list[int]]:
    """Group example indices into rows of at most ``max_length`` tokens (first fit, longest first)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for row, free in enumerate(room):
            if lengths[index] <= free:
                rows[row].append(index)
                room[row] -= lengths[index]
                break
        else:
            rows.append([index])
            room.append(max_length - lengths[index])
    return rows


def packed_rows(examples: list[dict], max_length: int) -> list[dict]:
    """Rows of concatenated examples; ``seq_lengths`` keeps where each example ends.

    The first label of every example is masked: it would otherwise be predicted from the
    previous example's last token.
    """
    rows = []
    for group in pack([len(example["input_ids"]) for example in examples], max_length):
        input_ids, labels, seq_lengths = [], [], []
        for index in group:
            example = examples[index]
            input_ids += example["input_ids"]
            labels += [-100] + example["labels"][1:]
            seq_lengths.append(len(example["input_ids"]))
        rows.append({"input_ids": input_ids, "labels": labels, "seq_lengths": seq_lengths})
    return rows


class PackedCollator:
    """Pads packed rows into a batch with restarting position ids and a block-diagonal causal mask."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, rows: list[dict]) -> dict:
        import torch

        width = max(len(row["input_ids"]) for row in rows)
        batch = len(rows)
        input_ids = torch.full((batch, width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((batch, width), -100, dtype=torch.long)
        position_ids = torch.zeros((batch, width), dtype=torch.long)
        segment = torch.full((batch, width), -1, dtype=torch.long)  # -1: padding
        for b, row in enumerate(rows):
            length = len(row["input_ids"])
            input_ids[b, :length] = torch.tensor(row["input_ids"])
            labels[b, :length] = torch.tensor(row["labels"])
            start = 0
            for number, size in enumerate(row["seq_lengths"]):
                position_ids[b, start : start + size] = torch.arange(size)
                segment[b, start : start + size] = number
                start += size
        causal = torch.tril(torch.ones((width, width), dtype=torch.bool))
        same = (segment[:, :, None] == segment[:, None, :]) & (segment[:, :, None] >= 0)
        mask = (same & causal) | torch.eye(width, dtype=torch.bool)  # padding sees itself only
        return {
            "input_ids": input_ids,
            "labels": labels,
            "position_ids": position_ids,
            "attention_mask": mask[:, None, :, :],
        }
