"""One-line errors and flags from dataclasses, for every command of the project.

A problem the user can fix is one line on stderr and exit code 2 (UsageError, cli);
every field of a dataclass is a flag (n_layer -> --n-layer) whose --help is the field's
comment.
"""
import argparse
import ast
import dataclasses
import inspect
import io
import math
import os
import re
import sys
import textwrap
import tokenize


class UsageError(Exception):
    """A problem the user can fix; printed as one line that says how, exit code 2."""


class Fault(Exception):
    """A failure outside the user's input (a lost process); printed as one line, exit code 1."""


def cli(main, argv=None):
    """Run main(argv) as a command: its return value is the exit code; a UsageError or a
    Fault is one line on stderr (exit 2 or 1), never a traceback."""
    try:
        code = main(argv)
    except (UsageError, Fault) as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2 if isinstance(e, UsageError) else 1
    except SystemExit as e:  # argparse's exits
        code = e.code
    if "RANK" in os.environ:
        # A torchrun worker leaves without the interpreter's teardown, its files written
        # and closed and its process group destroyed by now: that teardown frees gloo's
        # objects in whatever order, and can destroy a C++ thread unjoined ("terminate
        # called without an active exception"), which fails the whole torchrun job.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code if isinstance(code, int) else 0 if code is None else 1)
    sys.exit(code)


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 2, not argparse's usage block
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def field_help(cls):
    """{field: its --help text}: the comments on the field's own lines, continued by the
    comment-only lines directly below it (a blank or code line ends them). This reads the
    same whatever a formatter did to the layout: aligned columns, or black's and ruff's two
    spaces before the # and continuation comments at the block's indent."""
    try:
        src = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # a class made at runtime has no source
        return {}
    comments = {}  # line number -> (comment text, whether the line holds only the comment)
    lines = src.splitlines()
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT:
            row = tok.start[0]
            comments[row] = (tok.string.lstrip("#").strip(), not lines[row - 1][:tok.start[1]].strip())
    helps = {}
    for node in ast.parse(src).body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            rows = range(node.lineno, node.end_lineno + 1)
            text = [comments[r][0] for r in rows if r in comments]
            row = node.end_lineno + 1
            while comments.get(row, ("", False))[1]:
                text.append(comments[row][0])
                row += 1
            helps[node.target.id] = " ".join(t for t in text if t)
    return helps


def parse_value(text, typ, default):
    """A flag's text as its field's type; numbers must be finite (nan and inf are no
    setting a run can use)."""
    if typ is bool or isinstance(default, bool):
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError
    if isinstance(default, tuple):
        items = [v for v in text.split(",") if v]
        return tuple(parse_value(v, type(default[0]), default[0]) for v in items) if default else tuple(items)
    value = type(default)(text)
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError
    return value


def add_fields(parser, cls, title):
    """One flag per field of dataclass `cls` (n_layer -> --n-layer), in their own group;
    a flag not given stays out of the parsed namespace, so a preset can fill it."""
    group = parser.add_argument_group(title)
    helps = field_help(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        doc = f"{helps.get(f.name, '')} (default: {f.default})"
        if isinstance(f.default, bool):
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS, help=doc)
            continue

        def conv(text, f=f):
            try:
                return parse_value(text, f.type, f.default)
            except ValueError:
                item = f.default[0] if isinstance(f.default, tuple) and f.default else f.default
                want = {int: "an integer", float: "a finite number"}.get(type(item), type(item).__name__)
                want = f"a comma-separated list of {want.split()[-1]}s" if isinstance(f.default, tuple) else want
                raise argparse.ArgumentTypeError(f"invalid value {text!r}, not {want}")
        conv.__name__ = type(f.default).__name__
        group.add_argument(flag, dest=f.name, type=conv, default=argparse.SUPPRESS,
                           metavar=type(f.default).__name__.upper(), help=doc)


def check_ranges(cfg, rules):
    """Refuse, as one line (UsageError), the first field of dataclass `cfg` that breaks its
    rule: a tuple of the values allowed, or an interval as in mathematics ("[0, 1)",
    "(0, 1e3]", "[1, inf)"), optionally followed by a hint for the message. Only the side
    a value breaks is named: "--lr must be > 0 (got -1.0)", "--beta2 1.5 is too large: it must be below 1"."""
    for name, rule in rules.items():
        value, flag = getattr(cfg, name), "--" + name.replace("_", "-")
        if isinstance(rule, tuple):
            if value not in rule:
                raise UsageError(f"{flag} {value or repr(value)}: choose {', '.join(rule[:-1])} or {rule[-1]}")
            continue
        left, low, high, right, hint = re.fullmatch(r"([\[(])([^,]+),\s*([^\])]+)([\])])\s*(.*)", rule).groups()
        low, high = float(low), float(high)
        shown = lambda x: int(x) if x == int(x) else f"{x:g}"
        if value < low or (value == low and left == "("):
            says = (f"{flag} must not be negative" if low == 0 and left == "[" else
                    f"{flag} must be a positive integer" if isinstance(value, int) and low == 1 and left == "[" else
                    f"{flag} must be {'>' if left == '(' else '>='} {shown(low)}") + f" (got {value})"
        elif value > high or (value == high and right == ")"):
            says = f"{flag} {value} is too large: it must be {'below' if right == ')' else 'at most'} {shown(high)}"
        else:
            continue
        raise UsageError(says + (f"; {hint}" if hint else ""))
