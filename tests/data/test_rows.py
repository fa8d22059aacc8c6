"""Loading and validating rows: every problem names file, row and field; skipped rows are counted."""

from __future__ import annotations

import datasets
import pytest

from posttrain.config import DataSection
from posttrain.data.rows import DataError
from posttrain.data.sft import build_sft_samples


def conv(user: str = "2+2?", answer: str = "4") -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


BAD_ROWS = [
    ({"messages": [{"role": "bot", "content": "x"}]}, "field messages[0].role: unknown role 'bot'"),
    (
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]},
        "empty assistant",
    ),
    ({"messages": [{"role": "user", "content": "q"}]}, "no assistant turn"),
    ({"text": "no messages"}, "field messages: expected a non-empty list"),
]


@pytest.mark.parametrize(("bad", "expected"), BAD_ROWS)
def test_bad_row_error_names_file_row_and_field(write_jsonl, tokenizer, bad, expected):
    path = write_jsonl("train.jsonl", [conv(), conv(), bad, conv()])
    cfg = DataSection(train=[path])
    with pytest.raises(DataError) as info:
        build_sft_samples(cfg, tokenizer)
    message = str(info.value)
    assert message.startswith(f"{path}: line 3: ") and expected in message


def test_rows_of_files_without_lines_are_named_by_index(tmp_path, tokenizer):
    rows = [conv(), conv(), BAD_ROWS[0][0]]
    path = str(tmp_path / "train.parquet")
    datasets.Dataset.from_list(rows).to_parquet(path)
    with pytest.raises(DataError) as info:
        build_sft_samples(DataSection(train=[path]), tokenizer)
    assert str(info.value).startswith(f"{path}: row index 2: {BAD_ROWS[0][1]}")


def test_non_string_content_is_located_even_when_arrow_refuses_the_file(write_jsonl, tokenizer):
    bad = {"messages": [{"role": "user", "content": 7}, {"role": "assistant", "content": "x"}]}
    path = write_jsonl("train.jsonl", [conv(), bad])
    with pytest.raises(DataError) as info:
        build_sft_samples(DataSection(train=[path]), tokenizer)
    assert str(info.value).startswith(f"{path}: line 2: field messages[0].content: expected a string")


def test_invalid_json_line_is_located(write_jsonl, tokenizer):
    path = write_jsonl("train.jsonl", [conv(), "{not json"])
    with pytest.raises(DataError, match=r"train.jsonl: line 2: not valid JSON"):
        build_sft_samples(DataSection(train=[path]), tokenizer)


def test_skip_mode_counts_and_lists_every_skipped_row(write_jsonl, tokenizer):
    rows = [conv(), BAD_ROWS[0][0], conv(), BAD_ROWS[1][0], conv()]
    path = write_jsonl("train.jsonl", rows)
    samples, report = build_sft_samples(DataSection(train=[path], on_bad_row="skip"), tokenizer)
    assert len(samples) == 3 and report.used == 3 and report.rows == 5
    assert len(report.skipped) == 2
    assert report.skipped[0].startswith(f"{path}: line 2: ") and report.skipped[1].startswith(
        f"{path}: line 4: "
    )


def test_overlong_rows_are_truncated_or_dropped_and_counted(write_jsonl, tokenizer):
    long = conv(answer="1 + 1 = 2. " * 40)
    path = write_jsonl("train.jsonl", [conv(), long, conv()])
    samples, report = build_sft_samples(DataSection(train=[path], max_seq_len=64), tokenizer)
    assert report.truncated == 1 and samples.lengths.max() == 64 and len(samples) == 3
    samples, report = build_sft_samples(DataSection(train=[path], max_seq_len=64, overlong="drop"), tokenizer)
    assert (
        len(samples) == 2
        and len(report.dropped_overlong) == 1
        and f"{path}: line 2: " in report.dropped_overlong[0]
    )


def test_prompt_completion_rows_parquet_and_datasets_dir_give_the_same_tokens(
    tmp_path, write_jsonl, tokenizer
):
    rows = [{"prompt": f"{i} + 1 = ?", "completion": f"{i + 1}"} for i in range(5)]
    jsonl = write_jsonl("pc.jsonl", rows)
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "pc.parquet"))
    ds.save_to_disk(str(tmp_path / "pc_ds"))
    conversations = write_jsonl("conv.jsonl", [conv(r["prompt"], r["completion"]) for r in rows])
    results = [
        build_sft_samples(DataSection(train=[source]), tokenizer)[0]
        for source in (jsonl, str(tmp_path / "pc.parquet"), str(tmp_path / "pc_ds"), conversations)
    ]
    for other in results[1:]:
        assert (other.input_ids == results[0].input_ids).all()
        assert (other.loss_mask == results[0].loss_mask).all()


def test_no_usable_rows_says_why_in_one_line(write_jsonl, tokenizer):
    path = write_jsonl("train.jsonl", [BAD_ROWS[0][0], BAD_ROWS[2][0]])
    with pytest.raises(DataError) as info:
        build_sft_samples(DataSection(train=[path], on_bad_row="skip"), tokenizer)
    assert str(info.value) == (
        f"no usable rows in {path}: of 2, 2 malformed, 0 over data.max_seq_len, 0 without target tokens; "
        f"first: {path}: line 1: {BAD_ROWS[0][1]} (expected one of system, user, assistant)"
    )
