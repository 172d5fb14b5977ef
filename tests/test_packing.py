import torch

from qlora_kit.packing import PackedCollator, pack, packed_rows


def test_pack_fills_rows_without_overflow():
    lengths = [5, 3, 8, 2, 7, 1]
    rows = pack(lengths, 10)
    assert sorted(i for row in rows for i in row) == list(range(6))
    assert all(sum(lengths[i] for i in row) <= 10 for row in rows)
    assert len(rows) == 3 and rows == pack(lengths, 10)  # 26 tokens in 3 rows of 10, deterministic


def test_packed_examples_do_not_see_each_other(tiny_model):
    """Logits of examples packed in one row equal their logits alone (SDPA, 4-D block mask)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, attn_implementation="sdpa").eval()
    generator = torch.Generator().manual_seed(0)
    examples = []
    for length in (9, 6, 4, 7):
        ids = torch.randint(10, 500, (length,), generator=generator).tolist()
        examples.append({"input_ids": ids, "labels": ids})
    rows = packed_rows(examples, 16)
    batch = PackedCollator(pad_token_id=0)(rows)
    with torch.no_grad():
        packed = model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], attention_mask=batch["attention_mask"]
        ).logits
        assert not torch.isnan(packed).any()
        for b, row in enumerate(rows):
            start = 0
            for size in row["seq_lengths"]:
                alone = next(e for e in examples if len(e["input_ids"]) == size)
                reference = model(input_ids=torch.tensor([alone["input_ids"]])).logits[0]
                torch.testing.assert_close(packed[b, start : start + size], reference, atol=1e-5, rtol=1e-4)
                start += size


def test_first_label_of_each_packed_example_is_masked():
    examples = [{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}, {"input_ids": [4, 5], "labels": [-100, 5]}]
    (row,) = packed_rows(examples, 8)
    assert row["input_ids"] == [1, 2, 3, 4, 5] and row["labels"] == [-100, 2, 3, -100, 5]
    batch = PackedCollator(0)([row, {"input_ids": [7], "labels": [7], "seq_lengths": [1]}])
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 0, 0, 0, 0]]
    assert batch["attention_mask"].shape == (2, 1, 5, 5)
    assert batch["attention_mask"][0, 0, 3].tolist() == [False, False, False, True, False]
