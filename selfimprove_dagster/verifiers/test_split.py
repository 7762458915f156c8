"""Split a code row's tests into the candidate's calls and the judge's comparisons.

    plan_tests(tests, entry_point, helper_names, task_names) -> [SplitTest | ProcessTest]
    run_split(test, call)                                     # raises TestFailed

A test such as `assert remove_Occ("hello", "l") == "heo"` becomes a comparison the
judge evaluates itself, `__judge_call__(0, ["hello", "l"]) == "heo"`, and a call site,
`remove_Occ(__a[0], __a[1])`: what the candidate's process receives is that text and
the arguments' values. The call runs there and returns plain data
(`sandbox_runner.encode`); the comparison runs here, with the judge's own builtins
and modules (`PARENT_NAMES`). Nothing the candidate defines can
reach it: an object whose `__eq__` is always True does not cross as data, and a
candidate that rebinds `set` or `math.isclose` rebinds them in its own process only.

Which names belong to whom:

- the task's names (what the row's reference solution defines, the `entry_point`, and
  HumanEval's `candidate` parameter, which stands for the entry point) and names
  defined nowhere else (the candidate's functions, `test_setup`'s objects) are the
  candidate's: an expression rooted at one is a call site;
- the judge's names: builtins that only compute on data (`len`, `sorted`, `set`,
  `abs`, ...), `math`, `cmath`, `re`, `string`, `copy`, `collections` and
  `sys.getsizeof`, and the test's own variables (earlier assignments, loop variables
  of comprehensions, lambda parameters).

A call's arguments are evaluated by the judge and sent as values (`__a[0]`), so the
candidate never sees how the test built them (`decode(encode("abc"))`); the test's
own variables work the same way (HumanEval's `lst = list(range(-99, 100, 2))` /
`assert candidate(lst) == odd_sum`). Only arguments made of the candidate's own names
(`test_setup`'s `root`, `g(1)` inside `f(g(1))`) travel as source text, and an argument
that is not plain data (`int`, a lambda) is sent as the test wrote it.

Statements the judge runs: `assert`, assignments to names, expression statements,
`import` of its own modules, `pass`; HumanEval's layout (`METADATA`, `def
check(candidate): ...`) is read as its body.

A test that cannot be split (a `for` loop, a helper the row's prompt defines, another
module, a function the test builds from its own variables, ...) becomes a
`ProcessTest`: it runs in a second fresh sandbox where the candidate's names are
proxies that pass plain data to the judge, which calls the candidate's process and
passes plain data back; that process never sees the candidate's code.
"""

from __future__ import annotations

import ast
import builtins
import cmath
import collections
import copy
import math
import re
import string
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from types import CodeType, SimpleNamespace
from typing import Any

CALL = "__judge_call__"  # the judge's function in a rewritten comparison
ARGS = "__a"  # the name the candidate's process binds a call's data arguments to

# Builtins the judge evaluates itself: functions and types that compute on plain data.
_BUILTINS = (
    "abs", "all", "any", "ascii", "bin", "bool", "bytes", "chr", "complex", "dict",
    "divmod", "enumerate", "filter", "float", "frozenset", "hash", "hex", "int",
    "isinstance", "issubclass", "iter", "len", "list", "map", "max", "min", "next", "oct",
    "ord", "pow", "range", "repr", "reversed", "round", "set", "slice", "sorted", "str",
    "sum", "tuple", "type", "zip",
)  # fmt: skip
PARENT_NAMES: dict[str, Any] = {
    **{name: getattr(builtins, name) for name in _BUILTINS},
    "print": lambda *args, **kwargs: None,  # a test's prints go nowhere, as before
    "math": math,
    "cmath": cmath,
    "re": re,
    "string": string,
    "copy": copy,
    "collections": collections,
    "sys": SimpleNamespace(getsizeof=sys.getsizeof, maxsize=sys.maxsize),
}
PARENT_MODULES = ("math", "cmath", "re", "string", "copy", "collections")

_EXPRESSIONS = (
    ast.BoolOp, ast.BinOp, ast.UnaryOp, ast.Lambda, ast.IfExp, ast.Dict, ast.Set,
    ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp, ast.Compare, ast.Call,
    ast.JoinedStr, ast.FormattedValue, ast.Constant, ast.Attribute, ast.Subscript,
    ast.Starred, ast.Name, ast.List, ast.Tuple, ast.Slice, ast.comprehension,
    ast.keyword, ast.arguments, ast.arg, ast.expr_context, ast.boolop, ast.operator,
    ast.unaryop, ast.cmpop,
)  # fmt: skip


class Unsplittable(Exception):
    """Why a test cannot be split (it then runs in the tests process)."""


class TestFailed(Exception):
    """A test failed; the message is the verdict's words ("AssertionError", ...)."""

    __test__ = False  # not a pytest class

    def __init__(self, error: str, statement: str, status: str = "failed"):
        super().__init__(error)
        self.error, self.statement, self.status = error, statement, status


@dataclass(frozen=True)
class CallSite:
    """Source evaluated in the candidate's namespace, data arguments bound as `__a`."""

    template: str
    discard: bool = False  # the result is not used (an expression statement)
    # The call as the test wrote it, sent instead when an argument the judge evaluated
    # is not plain data (a type, a function); None when the test's variables are used.
    as_written: str | None = None


@dataclass(frozen=True)
class Step:
    """One statement of a split test, compiled for the judge."""

    kind: str  # "assert" (eval, falsy fails) | "exec" (assignment, expression) | "bind"
    code: CodeType | None
    source: str  # the statement as written (for the verdict's reason)
    binds: tuple[tuple[str, str, str | None], ...] = ()  # "bind": (name, module, attribute)


@dataclass(frozen=True)
class ProcessTest:
    """A test that runs in the tests process, the candidate's names as proxies."""

    source: str  # what the tests process runs (HumanEval: with `check(entry_point)`)
    shown: str  # the test as the row gives it (for the verdict's reason)
    proxies: tuple[str, ...]  # names that call the candidate's process
    modules: tuple[str, ...]  # standard-library modules the test uses without importing
    why: str  # why it could not be split


@dataclass(frozen=True)
class SplitTest:
    """A test the judge evaluates itself around the candidate's calls."""

    source: str
    steps: tuple[Step, ...]
    calls: tuple[CallSite, ...]
    fallback: ProcessTest  # how it runs if an argument turns out not to be plain data


def plan_tests(
    tests: Iterable[str],
    entry_point: str | None = None,
    helper_names: Iterable[str] = (),
    task_names: Iterable[str] = (),
) -> list[SplitTest | ProcessTest]:
    """One plan per test, in order (see the module docstring)."""
    helpers, tasks = frozenset(helper_names), frozenset(task_names)
    if entry_point:
        tasks |= {entry_point}
    return [_plan(test, entry_point, helpers, tasks) for test in tests]


def run_split(test: SplitTest, call: Callable[[int, list[Any]], Any]) -> None:
    """Run a split test: `call(k, args)` runs call site k in the candidate's process and
    returns its plain data (or raises). Raises TestFailed on the first failing step."""
    namespace: dict[str, Any] = {"__builtins__": {}, **PARENT_NAMES, CALL: call}
    for step in test.steps:
        try:
            if step.kind == "bind":
                for name, module, attribute in step.binds:
                    value = PARENT_NAMES[module]
                    namespace[name] = getattr(value, attribute) if attribute else value
            elif step.kind == "exec":
                exec(step.code, namespace)
            elif not eval(step.code, namespace):  # never an `assert`: `python -O` drops them
                raise TestFailed("AssertionError", step.source)
        except TestFailed:
            raise
        except CandidateRaised as err:
            raise TestFailed(str(err), step.source) from None
        except UnserializableResult as err:
            raise TestFailed(f"returned {err}", step.source, "unserializable_result") from None
        except NeedsProcess:
            raise
        except Exception as err:  # the comparison itself failed (TypeError, ...)
            raise TestFailed(f"{type(err).__name__}: {str(err)[:300]}", step.source) from None


class CandidateRaised(Exception):
    """The candidate's call raised; the message is its exception in words."""


class UnserializableResult(Exception):
    """The candidate's call returned something that is not plain data."""


class NeedsProcess(Exception):
    """A split test met something it cannot send (an argument that is not plain data)."""


# --- planning ----------------------------------------------------------------------


def _plan(
    source: str, entry: str | None, helpers: frozenset[str], tasks: frozenset[str]
) -> SplitTest | ProcessTest:
    try:
        module = ast.parse(source)
    except SyntaxError as err:
        return _process(source, source, ast.Module([], []), helpers, tasks, f"syntax: {err}")
    statements, rename, runnable = module.body, {}, source
    check = [s for s in module.body if isinstance(s, ast.FunctionDef) and s.name == "check"]
    if entry and len(check) == 1:  # HumanEval: `def check(candidate): ...`, then check(entry)
        runnable = f"{source.rstrip()}\n\ncheck({entry})\n"
        function, params = check[0], check[0].args
        statements = [s for s in module.body if s is not function] + function.body
        module = ast.parse(runnable)
        if len(params.args) != 1 or params.vararg or params.kwonlyargs or params.kwarg:
            return _process(runnable, source, module, helpers, tasks, "check() signature")
        if function.decorator_list:
            return _process(runnable, source, module, helpers, tasks, "decorated check()")
        rename = {params.args[0].arg: entry}
    fallback = _process(runnable, source, module, helpers, tasks, "an argument not plain data")
    planner = _Planner(source, helpers, tasks | set(rename), rename)
    try:
        steps = tuple(step for s in statements if (step := planner.step(s)) is not None)
    except Unsplittable as why:
        return replace(fallback, why=str(why))
    return SplitTest(source, steps, tuple(planner.calls), fallback)


def _process(
    runnable: str,
    shown: str,
    module: ast.Module,
    helpers: frozenset[str],
    tasks: frozenset[str],
    why: str,
) -> ProcessTest:
    loaded, bound = set(), set()
    for node in ast.walk(module):
        if isinstance(node, ast.Name):
            (loaded if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, ast.alias):
            bound.add((node.asname or node.name).split(".")[0])
    free = loaded - bound - helpers
    modules = sorted(n for n in free if n in sys.stdlib_module_names and n not in tasks)
    proxies = sorted(n for n in free if n in tasks or not (hasattr(builtins, n) or n in modules))
    return ProcessTest(runnable, shown, tuple(proxies), tuple(modules), why)


class _Planner:
    """Rewrites a test's statements for the judge; collects the call sites."""

    def __init__(
        self, source: str, helpers: frozenset[str], tasks: set[str], rename: dict[str, str]
    ):
        self.source, self.helpers, self.tasks, self.rename = source, helpers, tasks, rename
        self.variables: set[str] = set()  # the test's own names, bound so far
        self.calls: list[CallSite] = []

    # statements ---------------------------------------------------------------

    def step(self, statement: ast.stmt) -> Step | None:
        shown = ast.get_source_segment(self.source, statement) or ast.unparse(statement)
        if isinstance(statement, ast.Pass):
            return None
        if isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant):
            return None  # a docstring
        if isinstance(statement, ast.Import | ast.ImportFrom):
            return self._import(statement, shown)
        self.variables |= _bound_inside(statement)
        if isinstance(statement, ast.Assert):
            test = self.expression(statement.test)
            return Step("assert", _compile_eval(test), shown)
        if isinstance(statement, ast.Assign) and all(map(_is_names, statement.targets)):
            value = self.expression(statement.value)
            self.variables |= {n.id for t in statement.targets for n in ast.walk(t) if _name(n)}
            return Step("exec", _compile_exec(ast.Assign(statement.targets, value)), shown)
        if isinstance(statement, ast.Expr):
            value = self.expression(statement.value, discard=True)
            return Step("exec", _compile_exec(ast.Expr(value)), shown)
        raise Unsplittable(f"a {type(statement).__name__} statement")

    def _import(self, statement: ast.Import | ast.ImportFrom, shown: str) -> Step:
        binds = []
        if isinstance(statement, ast.Import):
            for alias in statement.names:
                if alias.name not in PARENT_MODULES:
                    raise Unsplittable(f"import {alias.name}")
                binds.append((alias.asname or alias.name, alias.name, None))
        else:
            if statement.module not in PARENT_MODULES or statement.level:
                raise Unsplittable(f"from {statement.module} import")
            for alias in statement.names:
                if alias.name == "*" or alias.name.startswith("_"):
                    raise Unsplittable(f"from {statement.module} import {alias.name}")
                binds.append((alias.asname or alias.name, statement.module, alias.name))
        self.variables |= {name for name, _, _ in binds}
        return Step("bind", None, shown, tuple(binds))

    # expressions --------------------------------------------------------------

    def expression(self, node: ast.expr, discard: bool = False) -> ast.expr:
        """`node` for the judge: the candidate's parts replaced by call sites."""
        if discard and self._is_root(node):
            return self._call_site(node, discard=True)
        return ast.fix_missing_locations(self._rewrite(node))

    def _rewrite(self, node: ast.AST) -> ast.AST:
        if not self._tainted(node):
            self._check_judges(node)
            return node
        if isinstance(node, ast.expr) and self._is_root(node):
            return self._call_site(node)
        if not isinstance(node, _EXPRESSIONS):
            raise Unsplittable(f"a {type(node).__name__} around the candidate's code")
        if isinstance(node, ast.Attribute) and node.attr.startswith("_"):
            raise Unsplittable(f"attribute {node.attr}")
        fields = {}
        for field, value in ast.iter_fields(node):
            if isinstance(value, ast.AST):
                value = self._rewrite(value)
            elif isinstance(value, list):
                value = [self._rewrite(v) if isinstance(v, ast.AST) else v for v in value]
            fields[field] = value
        return ast.copy_location(type(node)(**fields), node)

    def _is_root(self, node: ast.expr) -> bool:
        """An expression the candidate's code computes: one of its names, a call of
        something of its own, or an attribute / item of one of its names."""
        if isinstance(node, ast.Name):
            return self._owner(node.id) == "candidate"
        if isinstance(node, ast.Call):
            return self._tainted(node.func)
        base = node
        while isinstance(base, ast.Attribute | ast.Subscript):
            base = base.value
        return base is not node and isinstance(base, ast.Name) and self._is_root(base)

    def _call_site(self, node: ast.expr, discard: bool = False) -> ast.expr:
        data: list[ast.expr] = []
        as_written = True  # every argument could also be sent as its source text

        def argument(expr: ast.expr) -> ast.expr:
            nonlocal as_written
            names = {n.id for n in ast.walk(expr) if _name(n)}
            if names and all(self._owner(n) == "candidate" for n in names):
                return self._renamed(expr)  # its own objects (`root`, `g(1)`): beside it
            if isinstance(expr, ast.Lambda | ast.GeneratorExp):  # a function: only as code
                if self._uses_variables(expr) or any(self._owner(n) == "other" for n in names):
                    raise Unsplittable("a function built from the test's variables")
                return self._renamed(expr)
            as_written &= not self._uses_variables(expr)
            data.append(self._rewrite(expr))  # evaluated by the judge, sent as its value
            index = ast.Constant(len(data) - 1)
            return ast.Subscript(ast.Name(ARGS, ast.Load()), index, ast.Load())

        if isinstance(node, ast.Call):
            if self._uses_variables(node.func):
                raise Unsplittable("a call chosen by the test's variables")
            args = [
                ast.Starred(argument(a.value), ast.Load())
                if isinstance(a, ast.Starred)
                else argument(a)
                for a in node.args
            ]
            keywords = [ast.keyword(k.arg, argument(k.value)) for k in node.keywords]
            template = ast.Call(self._renamed(node.func), args, keywords)
        else:
            if self._uses_variables(node):
                raise Unsplittable("the candidate's data indexed by the test's variables")
            template = self._renamed(node)
        written = _source(self._renamed(node)) if data and as_written else None
        self.calls.append(CallSite(_source(template), discard, written))
        index = ast.Constant(len(self.calls) - 1)
        return ast.Call(ast.Name(CALL, ast.Load()), [index, ast.List(data, ast.Load())], [])

    # names ---------------------------------------------------------------------

    def _owner(self, name: str) -> str:
        """ "candidate", "judge" (its names, the test's variables) or "other"."""
        if name in self.tasks:
            return "candidate"
        if name in self.helpers:
            return "other"  # the row's own helper: trusted code, in the tests process
        if name in self.variables or name in PARENT_NAMES:
            return "judge"
        if name in sys.stdlib_module_names or hasattr(builtins, name):
            return "other"
        return "candidate"

    def _tainted(self, node: ast.AST) -> bool:
        return any(_name(n) and self._owner(n.id) == "candidate" for n in ast.walk(node))

    def _uses_variables(self, node: ast.AST) -> bool:
        return any(_name(n) and n.id in self.variables for n in ast.walk(node))

    def _check_judges(self, node: ast.AST) -> None:
        for inner in ast.walk(node):
            if not isinstance(inner, _EXPRESSIONS):
                raise Unsplittable(f"a {type(inner).__name__} in the comparison")
            if isinstance(inner, ast.Attribute) and inner.attr.startswith("_"):
                raise Unsplittable(f"attribute {inner.attr}")
            if _name(inner) and self._owner(inner.id) != "judge" and inner.id != ARGS:
                raise Unsplittable(f"name {inner.id}")

    def _renamed(self, node: ast.expr) -> ast.expr:
        if not self.rename:
            return node
        node = copy.deepcopy(node)
        for inner in ast.walk(node):
            if _name(inner) and inner.id in self.rename:
                inner.id = self.rename[inner.id]
        return node


def _name(node: ast.AST) -> bool:
    return isinstance(node, ast.Name)


def _is_names(target: ast.expr) -> bool:
    if isinstance(target, ast.Tuple | ast.List):
        return all(_is_names(t) for t in target.elts)
    return isinstance(target, ast.Name)


def _bound_inside(statement: ast.stmt) -> set[str]:
    """Names a statement binds inside its expressions: comprehension targets, lambda
    parameters, `:=` targets."""
    names = set()
    for node in ast.walk(statement):
        if isinstance(node, ast.comprehension):
            names |= {n.id for n in ast.walk(node.target) if _name(n)}
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, ast.NamedExpr):
            names.add(node.target.id)
    return names


def _source(node: ast.AST) -> str:
    return ast.unparse(ast.fix_missing_locations(node))


def _compile_eval(node: ast.expr) -> CodeType:
    return compile(ast.Expression(node), "<test>", "eval")


def _compile_exec(statement: ast.stmt) -> CodeType:
    module = ast.Module([ast.fix_missing_locations(statement)], [])
    return compile(ast.fix_missing_locations(module), "<test>", "exec")
