"""The code judge's parts without a sandbox: splitting tests, the wire format, the
sandbox setting (refusal, explicit opt-out recorded in every verdict)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from selfimprove_dagster.errors import SelfImproveError
from selfimprove_dagster.verifiers import code, isolation, seccomp
from selfimprove_dagster.verifiers import sandbox_runner as wire
from selfimprove_dagster.verifiers.test_split import (
    ProcessTest,
    SplitTest,
    TestFailed,
    plan_tests,
    run_split,
)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _split(test: str, **kwargs) -> SplitTest:
    (plan,) = plan_tests([test], **kwargs)
    assert isinstance(plan, SplitTest), plan.why
    return plan


def _run(plan: SplitTest, answer) -> list:
    """Run a split test with `answer(template, args)` standing in for the candidate's
    process; the (template, args) pairs it was asked, in order."""
    asked = []

    def call(k, args):
        asked.append((plan.calls[k].template, args))
        return answer(plan.calls[k].template, args)

    run_split(plan, call)
    return asked


# --- splitting ---------------------------------------------------------------------


def test_an_assert_splits_into_the_call_and_the_judges_comparison():
    plan = _split("assert remove_Occ('hello', 'l') == 'heo'")
    assert [c.template for c in plan.calls] == ["remove_Occ(__a[0], __a[1])"]
    asked = _run(plan, lambda template, args: "heo")
    assert asked == [("remove_Occ(__a[0], __a[1])", ["hello", "l"])]  # values, no expected one
    with pytest.raises(TestFailed, match="AssertionError"):
        _run(plan, lambda template, args: "hello")


def test_the_judges_builtins_and_modules_stay_with_the_judge():
    plan = _split("assert set(f([1, 2])) == set([2, 1]) and math.isclose(g(2), 1.5)")
    assert [c.template for c in plan.calls] == ["f(__a[0])", "g(__a[0])"]
    _run(plan, lambda template, args: [1, 2, 2] if template.startswith("f") else 1.5000000001)
    size = _split("assert tuple_size(('A', 1)) == sys.getsizeof(('A', 1))")
    assert [c.template for c in size.calls] == ["tuple_size(__a[0])"]


def test_the_candidates_own_objects_and_calls_run_beside_it():
    plan = _split("assert is_tree_balanced(root.left) == False and f(g(1), [2])[0] == 2")
    assert [c.template for c in plan.calls] == ["is_tree_balanced(root.left)", "f(g(1), __a[0])"]
    _run(plan, lambda template, args: False if "tree" in template else [2])


def test_an_argument_only_code_can_pass_is_sent_as_written():
    plan = _split("assert apply(int, '7') == 7")
    assert plan.calls[0].template == "apply(__a[0], __a[1])"
    assert plan.calls[0].as_written == "apply(int, '7')"


def test_the_tests_own_variables_travel_as_data():
    check = (
        "METADATA = {}\n\ndef check(candidate):\n"
        "    lst = list(range(-3, 4, 2))\n"
        "    odd_sum = sum([i ** 2 for i in lst if i > 0])\n"
        "    assert candidate(lst) == odd_sum, 'message'\n"
        "    assert all(candidate([x]) == x * x for x in (1, 3))\n"
    )
    plan = _split(check, entry_point="double_the_difference")
    assert [c.template for c in plan.calls] == ["double_the_difference(__a[0])"] * 2
    assert all(c.as_written is None for c in plan.calls)  # the test's variables: values only
    asked = _run(plan, lambda template, args: sum(v * v for v in args[0] if v > 0))
    assert [args for _, args in asked] == [[[-3, -1, 1, 3]], [[1]], [[3]]]


def test_tests_it_cannot_split_go_to_the_tests_process():
    loop = "def check(candidate):\n    for x in range(3):\n        assert candidate(x) == x\n"
    helper = "def check(candidate):\n    assert candidate(encode_cyclic('abc')) == 'abc'\n"
    imports = "def check(candidate):\n    import random\n    assert candidate(random.random())\n"
    plans = plan_tests(
        [loop, helper, imports], entry_point="decode", helper_names={"encode_cyclic"}
    )
    assert all(isinstance(p, ProcessTest) for p in plans)
    assert [p.why for p in plans] == ["a For statement", "name encode_cyclic", "import random"]
    assert plans[0].source.endswith("check(decode)\n") and plans[0].proxies == ("decode",)
    assert plans[1].proxies == ("decode",)  # the row's helper is not the candidate's


def test_a_task_function_named_like_a_builtin_is_the_candidates():
    plan = _split("assert sum(10, 15) == 6", task_names={"sum"})
    assert [c.template for c in plan.calls] == ["sum(__a[0], __a[1])"]
    shadowed = _split("assert sum(f(2)) == 3")  # not the task's: the judge's own sum
    assert [c.template for c in shadowed.calls] == ["f(__a[0])"]


def test_every_mbpp_test_splits():
    """All 2,922 tests of MBPP's three files split; the counts are in the docs."""
    counted = {"split": 0, "process": 0}
    for name in ("train", "test", "prompt"):
        for line in (SHARED_DATA / "mbpp" / f"{name}.jsonl").open():
            record = json.loads(line)
            tasks = code._defined_names(record["code"], functions_only=True)
            for plan in plan_tests(record["test_list"], task_names=tasks):
                counted["split" if isinstance(plan, SplitTest) else "process"] += 1
    assert counted == {"split": 2922, "process": 0}


def test_the_comparison_survives_python_dash_o():
    plan = _split("assert f(1) == 2")
    assert all(step.kind == "assert" for step in plan.steps)  # evaluated, not `assert`ed
    with pytest.raises(TestFailed):
        _run(plan, lambda template, args: 3)


# --- the wire format -------------------------------------------------------------


PLAIN = [
    None,
    True,
    3,
    -2.5,
    math.inf,
    "text",
    b"\x00\xff",
    1 + 2j,
    range(1, 9, 2),
    [1, [2, (3, 4)]],
    {(1, 2): {"a": {3}}, "b": frozenset({1})},
    set(),
]


@pytest.mark.parametrize("value", PLAIN, ids=repr)
def test_plain_data_crosses_unchanged(value):
    body = wire.frame({"ok": wire.encode(value)})[4:]
    back = wire.decode(wire.parse_frame(body)["ok"])
    assert back == value and type(back) is type(value)


def test_subclasses_cross_as_their_base_type_and_iterators_as_iterators():
    from collections import Counter, namedtuple

    point = namedtuple("point", "x y")(1, 2)
    assert type(wire.decode(wire.encode(point))) is tuple
    assert wire.decode(wire.encode(Counter("aab"))) == {"a": 2, "b": 1}
    returned = wire.decode(wire.encode(x * 2 for x in range(3)))
    assert returned != [0, 2, 4] and list(returned) == [0, 2, 4]


class AlwaysEqual:
    def __eq__(self, other):
        return True


@pytest.mark.parametrize("value", [AlwaysEqual(), len, object(), [AlwaysEqual()]], ids=repr)
def test_what_is_not_plain_data_does_not_cross(value):
    with pytest.raises(wire.Unserializable):
        wire.encode(value)


@pytest.mark.parametrize(
    "data",
    [
        {"t": [1], "s": [2]},
        {"x": 1},
        {"s": [[1]]},
        {"d": [[1]]},
        {"c": ["1", 2]},
        {"r": [1, 2, 0]},
        {"b": "zz"},
        json.loads("[" * 150 + "]" * 150),
    ],
    ids=repr,
)
def test_the_judge_decodes_strictly(data):
    with pytest.raises(wire.WireError):
        wire.decode(data)


def test_a_frame_must_be_a_json_object():
    for body in (b"[1]", b"\xff", b"{", b'"ok"', b"[" * 100_000):
        with pytest.raises(wire.WireError):
            wire.parse_frame(body)


# --- the sandbox setting ---------------------------------------------------------


def test_no_sandbox_refuses_with_the_fix(monkeypatch):
    monkeypatch.delenv(isolation.SETTING, raising=False)
    monkeypatch.setattr(isolation, "bubblewrap_problem", lambda: "bwrap is not installed")
    row = {"answer": "", "tests": ["assert f() == 1"]}
    with pytest.raises(SelfImproveError) as err:
        code.verify_row("def f():\n    return 1\n", row)
    text = str(err.value)
    assert "bubblewrap cannot make one here (bwrap is not installed)" in text
    assert "apt-get install bubblewrap" in text and "SELFIMPROVE_CODE_SANDBOX=none" in text
    assert "\n" not in text


def test_running_without_a_sandbox_is_explicit_and_recorded(monkeypatch):
    monkeypatch.setenv(isolation.SETTING, "none")
    monkeypatch.setattr(isolation, "bubblewrap_problem", lambda: "bwrap is not installed")
    row = {"answer": "", "tests": ["assert f() == 1"]}
    right = code.verify_row("def f():\n    return 1\n", row)
    wrong = code.verify_row("def f():\n    return 2\n", row)
    assert right.correct and right.sandbox == "none"
    assert right.reason == "correct: judged without a sandbox (SELFIMPROVE_CODE_SANDBOX=none)"
    assert wrong.reason.endswith("; judged without a sandbox (SELFIMPROVE_CODE_SANDBOX=none)")
    assert isolation.sandbox_description()["sandbox"] == "none"


def test_an_unknown_sandbox_setting_names_the_choices(monkeypatch):
    monkeypatch.setenv(isolation.SETTING, "docker")
    with pytest.raises(SelfImproveError, match="`bubblewrap` .* or `none`"):
        isolation.sandbox_kind()


def test_the_description_names_bubblewrap_and_its_filter(monkeypatch):
    monkeypatch.delenv(isolation.SETTING, raising=False)
    description = isolation.sandbox_description()
    assert description["sandbox"].startswith("bubblewrap ")
    assert description["setting"] == "SELFIMPROVE_CODE_SANDBOX=bubblewrap"


def test_the_system_call_filter_is_known_for_both_cpus():
    for machine in ("x86_64", "aarch64"):
        program = seccomp.process_filter(machine)
        assert program and len(program) % 8 == 0 and len(program) // 8 < 256
    assert seccomp.process_filter("riscv64") is None
