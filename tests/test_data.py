"""Prompt data: both file shapes, row+field errors, length filtering, the arithmetic task
checked by an independent evaluator, the character tokenizer, and iterator resume."""

from __future__ import annotations

import ast
import json
import operator

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megatron_agpo.data import (
    LEVELS,
    ArithmeticConfig,
    DataValidationError,
    PromptEncoding,
    PromptIterator,
    build_char_tokenizer,
    encode_prompts,
    generate_arithmetic,
    load_prompts,
    split_of,
    write_problem_jsonl,
)
from megatron_agpo.rewards import check_answer


@pytest.fixture(scope="module")
def char_tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("char_tok")
    build_char_tokenizer(d)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(d))


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


VERL_ROWS = [
    {
        "data_source": "math500",
        "prompt": [{"role": "user", "content": "What is 1+1? Box it."}],
        "reward_model": {"style": "rule", "ground_truth": "2"},
        "extra_info": {"split": "test", "index": 7},
    },
    {
        "data_source": "aime",
        "prompt": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Compute 2*3."},
        ],
        "reward_model": {"style": "rule", "ground_truth": "6"},
        "extra_info": {"split": "test", "index": 8},
    },
]


# ---- loading both shapes ----


def test_load_problem_jsonl(tmp_path):
    p = write_jsonl(
        tmp_path / "math.jsonl",
        [
            {"problem": "What is $1/2+1/2$?", "answer": "1", "level": "Level 1"},
            "",  # a blank line is not a row
            {"problem": "Compute $3^2$.", "answer": 9},
        ],
    )
    ex = load_prompts(
        p, encoding=PromptEncoding(system_prompt="Think.", instruction_suffix=" Box it.")
    )
    assert [e.index for e in ex] == [0, 1]
    assert ex[0].messages == (
        {"role": "system", "content": "Think."},
        {"role": "user", "content": "What is $1/2+1/2$? Box it."},
    )
    assert ex[0].problem == "What is $1/2+1/2$?" and ex[0].ground_truth == "1"
    assert ex[0].metadata == {"level": "Level 1"} and ex[0].source == "math"
    assert ex[1].ground_truth == "9"  # ints are accepted as answers


def test_load_problem_renamed_keys(tmp_path):
    p = write_jsonl(tmp_path / "q.jsonl", [{"question": "2+2?", "final": "4"}])
    ex = load_prompts(p, encoding=PromptEncoding(problem_key="question", answer_key="final"))
    assert ex[0].problem == "2+2?" and ex[0].ground_truth == "4"


def test_load_verl_parquet(tmp_path):
    p = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(VERL_ROWS), p)
    ex = load_prompts(p, "verl", PromptEncoding(system_prompt="Sys."))
    assert [e.ground_truth for e in ex] == ["2", "6"]
    assert [e.source for e in ex] == ["math500", "aime"]
    assert ex[0].messages[0] == {"role": "system", "content": "Sys."}  # added: it had none
    assert ex[1].messages[0] == {"role": "system", "content": "Be brief."}  # kept its own
    assert len(ex[1].messages) == 2
    assert ex[1].problem == "Compute 2*3."
    assert ex[0].metadata["extra_info"] == {"split": "test", "index": 7}


def test_load_verl_jsonl_and_problem_parquet(tmp_path):
    ex = load_prompts(write_jsonl(tmp_path / "v.jsonl", VERL_ROWS), "verl")
    assert [e.problem for e in ex] == ["What is 1+1? Box it.", "Compute 2*3."]
    p = tmp_path / "m.parquet"
    pq.write_table(pa.Table.from_pylist([{"problem": "1+1", "answer": "2"}]), p)
    assert load_prompts(p)[0].ground_truth == "2"


# ---- every error names the row and the field ----


@pytest.mark.parametrize(
    "bad_row, message",
    [
        ({"answer": "1"}, r"row 1 \(line 2\): missing field 'problem'"),
        ({"problem": "x", "answer": None}, r"row 1 \(line 2\): missing field 'answer'"),
        (
            {"problem": 3, "answer": "1"},
            r"row 1 \(line 2\): field 'problem': expected str, got int",
        ),
        ({"problem": "x", "answer": [1]}, r"row 1 \(line 2\): field 'answer': expected str or int"),
        (
            {"problem": "x", "answer": True},
            r"row 1 \(line 2\): field 'answer': expected .*got bool",
        ),
        ({"problem": "x", "answer": "  "}, r"row 1 \(line 2\): field 'answer' is empty"),
        ({"problem": "", "answer": "1"}, r"row 1 \(line 2\): field 'problem' is empty"),
        ([1, 2], r"row 1 \(line 2\): expected a JSON object, got list"),
        ('{"problem": "x", "answer": ', r"row 1 \(line 2\): invalid JSON"),
    ],
)
def test_problem_errors(tmp_path, bad_row, message):
    p = write_jsonl(tmp_path / "bad.jsonl", [{"problem": "ok", "answer": "1"}, bad_row])
    with pytest.raises(DataValidationError, match="bad.jsonl " + message):
        load_prompts(p)


def _verl(**overrides):
    row = json.loads(json.dumps(VERL_ROWS[1]))
    row.update(overrides)
    return row


@pytest.mark.parametrize(
    "bad_row, message",
    [
        (_verl(prompt=None), "missing field 'prompt'"),
        (_verl(prompt="hi"), "field 'prompt': expected list, got str"),
        (_verl(prompt=[]), "field 'prompt' is an empty list"),
        (_verl(prompt=["hi"]), "field 'prompt\\[0\\]': expected a message object"),
        (_verl(prompt=[{"content": "x"}]), "field 'prompt\\[0\\]': missing field 'role'"),
        (_verl(prompt=[{"role": "bot", "content": "x"}]), "field 'prompt\\[0\\].role'"),
        (
            _verl(prompt=[{"role": "user", "content": 5}]),
            "field 'prompt\\[0\\]': field 'content': expected str, got int",
        ),
        (
            _verl(prompt=[{"role": "system", "content": "x"}]),
            "field 'prompt' has no non-empty user message",
        ),
        (_verl(reward_model=None), "missing field 'reward_model'"),
        (
            _verl(reward_model={"style": "rule"}),
            "field 'reward_model': missing field 'ground_truth'",
        ),
        (
            _verl(reward_model={"ground_truth": ""}),
            "field 'reward_model': field 'ground_truth' is empty",
        ),
        (
            _verl(reward_model={"ground_truth": 1.5}),
            "field 'reward_model': field 'ground_truth': expected str or int, got float",
        ),
    ],
)
def test_verl_errors(tmp_path, bad_row, message):
    p = write_jsonl(tmp_path / "bad.jsonl", [VERL_ROWS[0], VERL_ROWS[1], bad_row])
    with pytest.raises(DataValidationError, match=r"bad.jsonl row 2 \(line 3\): " + message):
        load_prompts(p, "verl")


def test_parquet_error_names_row(tmp_path):
    p = tmp_path / "bad.parquet"
    pq.write_table(
        pa.Table.from_pylist([{"problem": "a", "answer": "1"}, {"problem": "b", "answer": None}]), p
    )
    with pytest.raises(DataValidationError, match="bad.parquet row 1: missing field 'answer'"):
        load_prompts(p)


def test_unknown_extension_and_config_errors(tmp_path):
    with pytest.raises(ValueError, match="unsupported file type '.csv'"):
        load_prompts(tmp_path / "x.csv")
    with pytest.raises(ValueError, match=r"^format='csv': problem or verl$"):
        load_prompts(tmp_path / "x.jsonl", "csv")
    with pytest.raises(ValueError, match=r"^max_tokens=0: must be >= 1$"):
        encode_prompts([], None, 0)


# ---- length filter ----


def test_too_long_prompts_are_dropped_and_counted(tmp_path, char_tok):
    rows = [
        {"problem": "1+1=", "answer": "2"},
        {"problem": "x" * 50, "answer": "1"},
        {"problem": "22+1=", "answer": "23"},
        {"problem": "y" * 40, "answer": "1"},
    ]
    p = write_jsonl(tmp_path / "m.jsonl", rows)
    rows = load_prompts(p, encoding=PromptEncoding(instruction_suffix=""))
    kept, stats = encode_prompts(rows, char_tok, max_tokens=10)
    assert [e.index for e in kept] == [0, 2]
    assert (stats.total, stats.kept, stats.too_long, stats.too_long_indices) == (4, 2, 2, [1, 3])
    # Not truncated: the kept ids are the whole prompt, <bos> then one id per character.
    assert kept[1].prompt_ids == tuple([char_tok.bos_token_id] + char_tok.encode("22+1="))
    assert stats.longest_kept == 6


# ---- arithmetic task ----

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}


def safe_eval(expr: str) -> int:
    """Independent reference: walk Python's parse of the expression; only ints and + - *."""

    def walk(node):
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        raise ValueError(f"unexpected node {ast.dump(node)}")

    return walk(ast.parse(expr, mode="eval"))


def test_arithmetic_answers_match_independent_evaluation():
    cfg = ArithmeticConfig(levels=(1, 2, 3, 4, 5), num_train=500, num_eval=100)
    for split in ("train", "eval"):
        for ex in generate_arithmetic(cfg, split):
            assert ex.problem.endswith("=")
            assert int(ex.ground_truth) == safe_eval(ex.problem[:-1])
            spec = LEVELS[ex.metadata["level"]]
            expr = ex.problem[:-1]
            assert sum(expr.count(op) for op in "+-*") == spec.num_ops
            assert ex.messages == ({"role": "user", "content": ex.problem},)


def test_arithmetic_determinism_and_disjoint_splits():
    cfg = ArithmeticConfig(levels=(1, 2, 3), num_train=300, num_eval=60, seed=3)
    a, b = generate_arithmetic(cfg, "train"), generate_arithmetic(cfg, "train")
    assert a == b
    other = generate_arithmetic(ArithmeticConfig(levels=(1, 2, 3), num_train=300, seed=4), "train")
    assert [e.problem for e in other] != [e.problem for e in a]
    train = {e.problem for e in a}
    assert len(train) == 300  # distinct
    # Eval never overlaps train, even across seeds: the split is a hash of the expression.
    for seed in (3, 4, 5):
        ev = generate_arithmetic(ArithmeticConfig(levels=(1, 2, 3), num_eval=60, seed=seed), "eval")
        assert not train & {e.problem for e in ev}
        assert all(split_of(e.problem[:-1], cfg.eval_fraction) == "eval" for e in ev)
    # Level 1 has only 100 expressions: asking for more than exist fails loudly.
    with pytest.raises(ValueError, match="distinct train problems"):
        generate_arithmetic(ArithmeticConfig(levels=(1,), num_train=100), "train")


def test_arithmetic_round_trips_through_jsonl(tmp_path):
    ex = generate_arithmetic(ArithmeticConfig(num_train=20), "train")
    write_problem_jsonl(ex, tmp_path / "arith.jsonl")
    back = load_prompts(tmp_path / "arith.jsonl", encoding=PromptEncoding(instruction_suffix=""))
    assert [(e.messages, e.ground_truth) for e in back] == [
        (e.messages, e.ground_truth) for e in ex
    ]


def test_expected_answer_format_is_accepted_by_reward_rules():
    ex = generate_arithmetic(ArithmeticConfig(levels=(3,), num_train=5), "train")[0]
    check = check_answer("\\boxed{" + ex.ground_truth + "}", ex.ground_truth, prompt=ex.problem)
    assert check.zero_reason is None and check.answer == ex.ground_truth


# ---- character tokenizer ----


def test_char_tokenizer_round_trip(tmp_path, char_tok):
    text = "12+7*3=\\boxed{33} -5 (a)\nxyz"
    ids = char_tok.encode(text, add_special_tokens=False)
    assert len(ids) == len(text)
    assert char_tok.decode(ids) == text
    assert char_tok.unk_token_id in char_tok.encode("é", add_special_tokens=False)
    chat = [{"role": "user", "content": "1+2="}, {"role": "assistant", "content": "\\boxed{3}"}]
    assert char_tok.apply_chat_template(chat, tokenize=False) == "<bos>1+2=\\boxed{3}<eos>"
    prompt = char_tok.apply_chat_template(chat[:1], add_generation_prompt=True, tokenize=False)
    assert prompt == "<bos>1+2="
    assert len(char_tok) == 100
    assert {char_tok.pad_token, char_tok.eos_token} == {"<pad>", "<eos>"}
    # The saved folder loads the same as the object that built it.
    built = build_char_tokenizer(tmp_path / "again")
    assert built.get_vocab() == char_tok.get_vocab()


# ---- iterator resume ----


@pytest.mark.parametrize("stop_after", [0, 1, 3, 4, 5, 7])
def test_iterator_resume_equals_uninterrupted(stop_after):
    items = list(range(10))  # batch 4 over 10 items: batches 3, 5, 8 cross epoch boundaries
    ref = PromptIterator(items, batch_size=4, seed=11)
    expected = [ref.next_batch() for _ in range(12)]

    it = PromptIterator(items, batch_size=4, seed=11)
    got = [it.next_batch() for _ in range(stop_after)]
    state = json.loads(json.dumps(it.state_dict()))  # survives a checkpoint file
    resumed = PromptIterator(items, batch_size=4, seed=0)
    resumed.load_state_dict(state)
    got += [resumed.next_batch() for _ in range(12 - stop_after)]
    assert got == expected


def test_iterator_epochs_are_permutations():
    items = list(range(10))
    it = PromptIterator(items, batch_size=5, seed=1)
    epochs = [it.next_batch() + it.next_batch() for _ in range(3)]
    assert all(sorted(e) == items for e in epochs)
    assert epochs[0] != epochs[1]  # reshuffled each epoch
    assert it.state_dict()["epoch"] == 2 and it.state_dict()["offset"] == 10
    assert PromptIterator(items, 3, shuffle=False).next_batch() == [0, 1, 2]
    with pytest.raises(ValueError, match="state is for 10 items"):
        PromptIterator(list(range(9)), 3).load_state_dict(it.state_dict())


def test_empty_file_is_named(tmp_path):
    for name, text in (("e.jsonl", ""), ("b.jsonl", "\n  \n"), ("a.json", "[]")):
        path = tmp_path / name
        path.write_text(text)
        with pytest.raises(DataValidationError, match=rf"{path}: no rows \(the file is empty\)"):
            load_prompts(path)
    blank = tmp_path / "blank.json"
    blank.write_text(" \n")
    with pytest.raises(DataValidationError, match=rf"{blank}: the file is empty"):
        load_prompts(blank)


def test_bad_encoding_names_file_row_line_and_byte(tmp_path):
    path = tmp_path / "latin1.jsonl"
    good = json.dumps({"problem": "1+1", "answer": "2"}).encode()
    bad = '{"problem": "café", "answer": "3"}'.encode("latin-1")  # é is 0xe9
    path.write_bytes(good + b"\n\n" + bad + b"\n")
    with pytest.raises(
        DataValidationError,
        match=rf"{path} row 1 \(line 3\): not UTF-8 text \(byte 0xe9 at column 17\)",
    ):
        load_prompts(path)
    arr = tmp_path / "latin1.json"
    arr.write_bytes(b"[\n" + good + b",\n" + bad + b"\n]")
    with pytest.raises(DataValidationError, match=rf"{arr} \(line 3\): not UTF-8 text \(byte 0xe9"):
        load_prompts(arr)
    # A UTF-8 byte-order mark (Windows editors write one) is not an error.
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + good + b"\n")
    assert [r.ground_truth for r in load_prompts(bom)] == ["2"]


def test_held_out_split_refuses_to_hold_out_every_row(tmp_path):
    from megatron_agpo.data.loaders import held_out_split

    path = tmp_path / "few.jsonl"
    write_jsonl(path, [{"problem": f"{i}+0", "answer": str(i)} for i in range(3)])
    rows = load_prompts(path)
    held, train = held_out_split(rows, 1, str(path))
    assert [r.ground_truth for r in held] == ["0"] and [r.ground_truth for r in train] == ["1", "2"]
    with pytest.raises(DataValidationError, match=rf"{path}: 3 rows, not more than the 3 held"):
        held_out_split(rows, 3, str(path))


# ---- the data section owns the settings: data.prompt reaches the loader and the tokenizer ----

DEFAULT_RUN_PROMPTS = "278da3ad5750b3ac"
"""Digest of the default run's prompts (messages, token ids, answers) as `load_task` gives them
to the trainer; tests/test_default_curve.py's stored curve was sampled from exactly these."""


def _prompts_digest(examples) -> str:
    import hashlib

    blob = json.dumps(
        [
            [e.messages, e.prompt_ids, e.ground_truth, e.index, e.source, e.metadata]
            for e in examples
        ],
        default=list,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _task(overrides, tokenizer):
    from megatron_agpo.data.tasks import load_task
    from megatron_agpo.trainer.compose import load_config

    cfg = load_config(overrides)
    r = cfg.rollout
    return load_task(cfg.data, tokenizer, r.engine.max_model_len, r.max_new_tokens)


def test_the_default_runs_prompt_ids_are_unchanged(char_tok):
    task = _task([], char_tok)
    assert (len(task.train), len(task.held_out), task.prompt_budget) == (87, 13, 48)
    for ex in task.train + task.held_out:  # the char template: <bos>, then the problem's chars
        assert ex.prompt_ids == tuple([char_tok.bos_token_id] + char_tok.encode(ex.problem))
    assert _prompts_digest(task.train + task.held_out) == DEFAULT_RUN_PROMPTS


def test_data_prompt_keys_reach_the_file_loader_and_the_tokenizer(tmp_path, char_tok):
    rows = [{"question": f"{i}+1=", "final": str(i + 1), "id": i} for i in range(4)]
    path = write_jsonl(tmp_path / "q.jsonl", rows)
    keys = ["data=math_jsonl", f"data.path={path}", "data.num_eval=1",
            "data.prompt.problem_key=question", "data.prompt.answer_key=final",
            "data.prompt.system_prompt=S:", "data.prompt.instruction_suffix=?"]  # fmt: skip
    task = _task(keys, char_tok)
    ex = task.train[0]
    assert ex.messages == (
        {"role": "system", "content": "S:"},
        {"role": "user", "content": "1+1=?"},
    )
    assert (ex.problem, ex.ground_truth, ex.metadata) == ("1+1=", "2", {"id": 1})
    assert [e.ground_truth for e in task.held_out] == ["1"]
    assert ex.prompt_ids == tuple([char_tok.bos_token_id] + char_tok.encode("S:1+1=?"))
    # Without the chat template only the user turn is tokenized (no system turn).
    plain = _task([*keys, "data.prompt.use_chat_template=false"], char_tok).train[0]
    assert plain.prompt_ids == tuple(char_tok("1+1=?")["input_ids"])
    assert plain.prompt_ids != ex.prompt_ids


def test_the_file_is_checked_before_launch_as_the_trainer_reads_it(tmp_path, monkeypatch, char_tok):
    from megatron_agpo.trainer.compose import load_config
    from megatron_agpo.validate import data_problems

    monkeypatch.setenv("HOME", str(tmp_path))
    write_jsonl(tmp_path / "q.jsonl", [{"question": f"{i}+1=", "final": str(i)} for i in range(4)])
    base = ["data=math_jsonl", "data.path='~/q.jsonl'", "data.num_eval=1"]
    renamed = ["data.prompt.problem_key=question", "data.prompt.answer_key=final"]
    assert data_problems(load_config([*base, *renamed])) == []
    assert len(_task([*base, *renamed], char_tok).train) == 3  # ~ expanded
    assert data_problems(load_config(base)) == [
        f"data.path: {tmp_path / 'q.jsonl'} row 0 (line 1): missing field 'problem' (the fields "
        "read are data.prompt.problem_key='problem' and data.prompt.answer_key='answer')"
    ]
