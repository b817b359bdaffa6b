"""Tasks: rewards on right, wrong, malformed and hostile answers; seeded datasets; local files; registry."""

from __future__ import annotations

import json
import time
from fractions import Fraction

import pytest

from fastes.es import safe_math
from fastes.es.tasks import TASKS, Example, Task, arithmetic, collate_columns, countdown, get_task, gsm8k, jsonl

HOSTILE_BODIES = [
    "9**9**9**9",
    "9^9^9^9",
    "10**1000000",
    "(" * 10_000 + "1" + ")" * 10_000,
    "1+" * 500_000 + "1",
    "9" * 1_000_000,
    "x" * 1_000_000,
    "-" * 100_000 + "5",
    "__import__('os').system('echo pwned')",
    "exec('1')",
    "().__class__.__bases__[0].__subclasses__()",
    "lambda: 0",
    "１２ ＋ ３４",  # fullwidth digits
    "٣ + ٤",  # Arabic-Indic digits
    "1e308*1e308",
    "\x00\x01\x02",
    "<answer>" * 100_000,
]
HOSTILE_IDS = [f"hostile{i}" for i in range(len(HOSTILE_BODIES))]


def fast(fn, *args, **kwargs):
    """Call fn, asserting it takes < 50 ms (best of 3, so a busy shared CPU does not fail the test)."""
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        best = min(best, time.perf_counter() - start)
        if best < 0.05:
            break
    assert best < 0.05, f"took {best * 1000:.1f} ms"
    return out


# ---------------------------------------------------------------- safe_math


@pytest.mark.parametrize(
    "expr,value",
    [
        ("1+2*3", 7),
        ("(1+2)*3", 9),
        ("6/4*2", 3),
        ("7/2", Fraction(7, 2)),
        ("-(3-5)", 2),
        ("10 − 2 × 3 ÷ 4", Fraction(17, 2)),
        ("  ((4)) ", 4),
        ("2.5*2", 5),
    ],
)
def test_safe_math_values(expr, value):
    assert safe_math.evaluate(expr) == value


@pytest.mark.parametrize(
    "expr", ["", "1/0", "2(3)", "1 2", "(1+2", "1+", "*3", "3.", ".5", "1e5", "2**3", "2^3", "a+1"]
)
def test_safe_math_rejects(expr):
    assert safe_math.evaluate(expr) is None


def test_safe_math_limits_and_literals():
    assert safe_math.integer_literals("(12 + 3) * 4 - 12") == [12, 3, 4, 12]
    assert safe_math.integer_literals("2.5 * 2") is None
    assert safe_math.parse("1/0").value is None  # well-formed but undefined
    powered = safe_math.Limits(allow_power=True)
    assert safe_math.evaluate("2^10", powered) == 1024 and safe_math.evaluate("2**-2", powered) == Fraction(1, 4)
    assert safe_math.evaluate("2^3^2", powered) == 512  # right-associative
    assert safe_math.evaluate("9**9**9**9", powered) is None
    assert safe_math.evaluate("2^100000", powered) is None
    assert safe_math.evaluate("1" * 25) is None  # too many digits
    assert safe_math.evaluate("(" * 33 + "1" + ")" * 33) is None  # too deep
    assert safe_math.evaluate("(" * 30 + "1" + ")" * 30) == 1
    big = "*".join(["999999999999999999999999"] * 20)
    assert fast(safe_math.evaluate, big) is not None
    assert fast(safe_math.evaluate, "*".join([big] * 2)) is None  # over 512 characters
    long = safe_math.Limits(max_length=5000)
    assert fast(safe_math.evaluate, "*".join(["9" * 24] * 60), long) is None  # ~4800 bits > max_bits
    assert safe_math.evaluate("*".join(["9" * 24] * 30), long) == (10**24 - 1) ** 30


@pytest.mark.parametrize("body", HOSTILE_BODIES, ids=HOSTILE_IDS)
def test_safe_math_hostile_is_fast(body):
    assert fast(safe_math.evaluate, body) is None


# ---------------------------------------------------------------- countdown

NUMS, TARGET = [3, 5, 7, 2], 29


@pytest.mark.parametrize(
    "completion,expected",
    [
        ("<think>3*7=21, 21+5=26, 26+3...</think><answer>3*7 + 5 + 2 + 0*0</answer>", 0.1),  # extra literals
        ("<think>ok</think><answer>3*7 + 5 + 2 + 1</answer>", 0.1),
        ("<think>ok</think><answer>(3 * 7) + (5 + 2)</answer>", 0.1),  # 28
        ("<think>ok</think><answer>3 * 7 + 5 * 2 - 2</answer>", 0.1),  # reuses 2, omits nothing right
        ("<think>ok</think><answer>7*5 - 3*2</answer>", 1.0),
        ("<answer> 7 × 5 − 3 × 2 </answer>", 1.0),
        ("<answer>7*5 - 3*2 = 29</answer>", 1.0),
        ("<answer>29 = 7*5 - 3*2</answer>", 1.0),
        ("<answer>7*5 - 3*2 = 30</answer>", 0.1),
        ("<answer>(7*5 - 3*2)*1.0</answer>", 0.0),  # decimals are not countdown numbers
        ("<answer>7*5 - 3*2</answer> then <answer>1+1</answer>", 0.1),  # the last block counts
        ("<answer>1+1</answer> then <answer>7*5-3*2</answer>", 1.0),
        ("<answer>3/0 + 5 + 7 + 2</answer>", 0.1),
        ("7*5 - 3*2", 0.0),  # no tags
        ("<answer>7*5 - 3*2", 0.0),
        ("<answer>twenty nine</answer>", 0.0),
        ("", 0.0),
    ],
)
def test_countdown_reward_table(completion, expected):
    assert countdown.reward(completions=[completion], numbers=[NUMS], target=[TARGET]) == [expected]


@pytest.mark.parametrize("body", HOSTILE_BODIES, ids=HOSTILE_IDS)
def test_countdown_hostile_scores_zero_fast(body):
    for completion in (f"<answer>{body}</answer>", body, f"<think>{body}</think>"):
        assert fast(countdown.reward, completions=[completion], numbers=[NUMS], target=[TARGET]) == [0.0]


def test_countdown_conversational_and_alignment():
    msgs = [[{"role": "assistant", "content": "<answer>7*5-3*2</answer>"}]]
    assert countdown.reward(completions=msgs, numbers=[NUMS], target=[TARGET]) == [1.0]
    with pytest.raises(ValueError):
        countdown.reward(completions=["a", "b"], numbers=[NUMS], target=[TARGET])


def test_countdown_dataset_deterministic_and_solvable():
    a = get_task("countdown", seed=1, num_train=50, num_eval=20)
    b = get_task("countdown", seed=1, num_train=50, num_eval=20)
    c = get_task("countdown", seed=2, num_train=50, num_eval=20)
    assert [e.prompt for e in a.train_examples()] == [e.prompt for e in b.train_examples()]
    assert [e.prompt for e in a.train_examples()] != [e.prompt for e in c.train_examples()]
    assert [e.prompt for e in a.train_examples()][:20] != [e.prompt for e in a.eval_examples()]
    assert len(a.train_examples()) == 50 and len(a.eval_examples()) == 20
    for ex in a.train_examples() + a.eval_examples():
        nums, target = ex.columns["numbers"], ex.columns["target"]
        assert 3 <= len(nums) <= 4 and all(1 <= n <= 99 for n in nums) and 1 <= target <= 100
        assert str(nums) in ex.prompt and str(target) in ex.prompt and "<answer>" in ex.prompt
        assert a.is_correct(f"<think>x</think><answer>{ex.answer}</answer>", ex)  # the stored solution solves it
        assert not a.is_correct("<answer>1</answer>", ex)
    cols = a.columns(a.train_examples()[:3])
    assert set(cols) >= {"numbers", "target"} and len(cols["numbers"]) == 3
    assert a.reward(["<answer>0</answer>"] * 3, None, **cols) == [0.1] * 3
    base = get_task("countdown", template="base", num_train=1)
    assert base.train_examples()[0].prompt.endswith("<think>") and not base.use_chat_template


# ---------------------------------------------------------------- arithmetic


@pytest.mark.parametrize(
    "completion,expected",
    [
        ("408", 1.0),
        (" 408\n12*35=420", 1.0),
        ("0408", 1.0),
        ("The answer is 408.", 1.0),
        ("<think>12*34 is 408? maybe 407</think><answer>408</answer>", 1.0),
        ("<answer>407</answer> 408", 0.0),
        ("407", 0.0),
        ("-408", 0.0),
        ("four hundred eight", 0.0),
        ("", 0.0),
        ("４０８", 0.0),  # fullwidth digits are not read as the answer
    ],
)
def test_arithmetic_reward_table(completion, expected):
    assert arithmetic.reward(completions=[completion], answer=["408"]) == [expected]


def test_arithmetic_partial_credit():
    got = arithmetic.reward(completions=["418", "408", "9408", "-408", "x"], answer=["408"] * 5, partial_credit=True)
    assert got == pytest.approx([2 / 3, 1.0, 3 / 4, 0.0, 0.0])


@pytest.mark.parametrize("body", HOSTILE_BODIES, ids=HOSTILE_IDS)
def test_arithmetic_hostile_scores_zero_fast(body):
    for completion in (body, f"<answer>{body}</answer>"):
        assert fast(arithmetic.reward, completions=[completion], answer=["408"]) == [0.0]


def test_arithmetic_dataset():
    t = get_task("arithmetic", seed=3, digits=2, op="mul", num_train=30, num_eval=10)
    assert t.train_examples()[0].prompt.count("*") == 1 and t.train_examples()[0].prompt.endswith("=")
    same = get_task("arithmetic", seed=3, digits=2, op="mul", num_train=30, num_eval=10)
    other = get_task("arithmetic", seed=4, digits=2, op="mul", num_train=30, num_eval=10)
    assert [e.prompt for e in t.train_examples()] == [e.prompt for e in same.train_examples()]
    assert [e.prompt for e in t.train_examples()] != [e.prompt for e in other.train_examples()]
    train_prompts = {e.prompt for e in t.train_examples()}
    assert not train_prompts & {e.prompt for e in t.eval_examples()}
    for ex in t.train_examples():
        a, b = ex.columns["a"], ex.columns["b"]
        assert 10 <= a <= 99 and 10 <= b <= 99 and ex.answer == str(a * b) == ex.columns["answer"]
        assert ex.prompt == f"{a}*{b}="
        assert t.is_correct(ex.answer, ex) and not t.is_correct(str(a * b + 1), ex)
    add = get_task("arithmetic", op="add", digits=3, template="Q: {a} {sym} {b} ({op})\nA:", num_train=5, num_eval=0)
    ex = add.train_examples()[0]
    assert ex.prompt == f"Q: {ex.columns['a']} + {ex.columns['b']} (add)\nA:" and ex.answer == str(
        ex.columns["a"] + ex.columns["b"]
    )
    small = get_task("arithmetic", digits=1, num_train=200, num_eval=50)  # more than the 100-pair space: duplicates ok
    assert len(small.train_examples()) == 200 and len(small.eval_examples()) == 50
    partial = get_task("arithmetic", partial_credit=True)
    assert partial.reward(["418"], None, answer=["408"]) == pytest.approx([2 / 3])


# ---------------------------------------------------------------- gsm8k and jsonl


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return str(path)


def test_gsm8k_from_local_file(tmp_path):
    rows = [
        {"question": "Tom has 3 apples and buys 4. How many?", "answer": "3+4=<<3+4=7>>7\n#### 7"},
        {"question": "A shirt costs $1,200 each; two cost?", "answer": "2*1200=2400\n#### 2,400"},
        {"question": "Half of 5?", "answer": "#### 2.5"},
    ]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    t = get_task("gsm8k", train_path=path, num_eval=1)
    train, evals = t.train_examples(), t.eval_examples()
    assert [e.answer for e in train] == ["7", "2400"] and [e.answer for e in evals] == ["2.5"]
    assert train[0].prompt.startswith("Tom has 3 apples") and t.use_chat_template
    answers = ["7"] * 7
    completions = [
        "3 + 4 = 7\n#### 7",
        "so the total is 7.",
        "<answer>The answer is 7</answer>",
        "\\boxed{7}",
        "#### 8",
        "7 apples... no wait, 8",
        "#### $7.00",
    ]
    assert gsm8k.reward(completions=completions, answer=answers) == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0]
    assert gsm8k.reward(completions=["#### 2400", "2400", "#### 2,400"], answer=["2,400"] * 3) == [1.0, 1.0, 1.0]
    assert gsm8k.reward(completions=["x" * 1_000_000 + " 7"], answer=["#### 7"]) == [1.0]
    assert t.is_correct("#### 2.50", evals[0])
    with pytest.raises(ValueError, match="not found"):
        get_task("gsm8k", train_path=str(tmp_path / "missing.jsonl")).train_examples()
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "q", "answer": "no number here"}])
    with pytest.raises(ValueError, match="row 1"):
        get_task("gsm8k", train_path=bad).train_examples()


def test_jsonl_generic_task(tmp_path):
    rows = [{"q": "Capital of France?", "a": "Paris", "lang": "en"}, {"q": "2+2?", "a": "4", "lang": "en"}]
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    exact = get_task("jsonl", train_path=path, eval_path=path, prompt_column="q", answer_column="a")
    exs = exact.train_examples()
    assert [e.prompt for e in exs] == ["Capital of France?", "2+2?"] and exs[0].columns == {
        "lang": "en",
        "answer": "Paris",
    }
    cols = collate_columns(exs)
    assert exact.reward([" paris ", "<answer>4</answer>"], None, **cols) == [1.0, 1.0]
    assert exact.reward(["It is Paris", "four"], None, **cols) == [0.0, 0.0]
    contains = get_task("jsonl", train_path=path, prompt_column="q", answer_column="a", match="contains")
    assert contains.reward(["It is Paris.", "4 of course"], None, **cols) == [1.0, 1.0]
    numeric = get_task("jsonl", train_path=path, prompt_column="q", answer_column="a", match="numeric", tolerance=0.01)
    assert numeric.reward(["the result: 4.001"], None, answer=["4"]) == [1.0]
    assert jsonl.reward(completions=["4.5"], answer=["4"], match="numeric") == [0.0]
    templated = get_task("jsonl", train_path=path, answer_column="a", template="[{lang}] {q}")
    assert templated.train_examples()[0].prompt == "[en] Capital of France?"
    with pytest.raises(ValueError, match="prompt template"):
        get_task("jsonl", train_path=path, answer_column="a", template="{missing}").train_examples()
    with pytest.raises(ValueError, match="answer column"):
        get_task("jsonl", train_path=path, prompt_column="q").train_examples()
    with pytest.raises(ValueError):
        get_task("jsonl", train_path=path, match="fuzzy")


# ---------------------------------------------------------------- registry and base


def test_registry():
    assert set(TASKS) == {"countdown", "arithmetic", "gsm8k", "jsonl", "datasets"}
    assert isinstance(get_task("Countdown"), Task)
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        get_task("nope")
    with pytest.raises(ValueError, match="bad options"):
        get_task("arithmetic", nonsense=1)
    with pytest.raises(ValueError):
        get_task("arithmetic", op="pow")
    with pytest.raises(ValueError):
        get_task("gsm8k")


def test_example_columns_collate():
    exs = [Example("p", "a", {"x": 1}), Example("q", "b", {"y": 2})]
    assert collate_columns(exs) == {"x": [1, None], "y": [None, 2]}
