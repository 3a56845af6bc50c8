"""Every command the docs show still runs: each shell command in README.md and docs/*.md
that calls one of the project's scripts is held against that script's own argument
parser, in this process (flags parsed and checked, nothing trained, sampled or measured).

What is collected: fenced code blocks with no language or bash/sh/shell/zsh/console (in a
console block only the `$ ` lines); backslash-continued lines joined (reported at their
first line); split by shlex into simple commands at `&&`, `||`, `;`, `|` and `&`; leading
VAR=value assignments and `env` dropped.

What is checked, by the command's script:
  train.py (python, torchrun, python -m torch.distributed.run)
            train.parse_args then train.check, as bench.py's --dry-run does; torchrun's
            own options by torch.distributed.run's parser
  bench.py  bench.main(argv + --dry-run): its parser, then each train row's flags
  sample.py sample.parse_args
  metrics.py metrics.parse_args (with --device cpu appended: CUDA need not be here)
  plot.py   its parse_args or parser(), if it has a command line at all
  tools/*   the script exists; a tools/*.sh's options are the ones its `usage:` line
            names ([--flag a|b|c] or [--flag N]); one whose usage ends in `command ...`
            wraps a command, which is checked in turn
Anything else (pip, git, cd, mkdir, python -c, python -m pytest, ...) is skipped. Paths
need not exist (a checkpoint to --init-from, a dataset): only flags are parsed. A file
an earlier `cp SRC DST` of the same doc makes stands for SRC (--model experiments/mygpt.py
is checked as gpt.py).

Placeholders the docs write for a value the reader picks: the tokens in PLACEHOLDERS
become the value beside them; any other whole token in ALL CAPS or <angle brackets>
becomes "1" (an int, a float and a string alike). Optional parts written [--flag a|b]
are read as --flag a, and a lone `...` token is dropped.
"""
import contextlib
import functools
import glob
import importlib
import io
import os
import re
import shlex

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PLACEHOLDERS = {
    "R": "0",                        # torchrun --node-rank R
    "HOST:PORT": "localhost:29500",  # torchrun --rdzv-endpoint HOST:PORT
    "K": "50",                       # --top-k K
    "P": "0.95",                     # --top-p P
    "S": "1",                        # --seed S
    "T": "1.0",                      # --temperature T
    "N": "2",                        # --n N, --threads N
    "<model>": "gpt",                # --model <model>
}
OTHER_PLACEHOLDER = "1"
SHELL_LANGUAGES = {"", "bash", "sh", "shell", "zsh", "console"}
SCRIPTS = ("train.py", "sample.py", "metrics.py", "bench.py", "plot.py")
MIN_COMMANDS = 10


def doc_files():
    return [p for p in [os.path.join(ROOT, "README.md"), *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]
            if os.path.isfile(p)]


# ---- collecting ----------------------------------------------------------------------------

def shell_lines(path):
    """(line number, text) of each logical shell line in `path`'s shell code blocks,
    continuations joined, reported at the first line."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    out, fence, pending = [], None, None
    for number, raw in enumerate(lines, 1):
        opened = re.match(r"(\s*)(`{3,}|~{3,})\s*([^\s`{]*)", raw)
        if fence is None:
            if opened:
                fence = (opened.group(2), len(opened.group(1)), opened.group(3).lower())
            continue
        marker, indent, lang = fence
        if raw.strip().startswith(marker[0] * len(marker)) and not raw.strip().strip(marker[0]):
            fence, pending = None, None
            continue
        if lang not in SHELL_LANGUAGES:
            continue
        text = raw[indent:] if raw[:indent].strip() == "" else raw.lstrip()
        if pending is None:
            if lang == "console":
                if not text.startswith("$ "):
                    continue
                text = text[2:]
            elif text.startswith("$ "):
                text = text[2:]
            pending = (number, "")
        pending = (pending[0], pending[1] + text)
        if text.rstrip().endswith("\\"):
            pending = (pending[0], pending[1].rstrip()[:-1] + " ")
            continue
        out.append(pending)
        pending = None
    return out


def unbracket(text):
    """[--flag a|b|c] -> --flag a: an optional part, its first alternative."""
    def one(m):
        return re.sub(r"([^\s|]+)(?:\|[^\s|]+)+", r"\1", m.group(1))
    return re.sub(r"(?<!\S)\[([^\[\]]*)\]", one, text)


def simple_commands(text):
    """The simple commands of one shell line, each a list of words, or a ValueError."""
    lex = shlex.shlex(unbracket(text), posix=True, punctuation_chars=";&|")
    lex.whitespace_split = True
    commands, words = [], []
    for token in lex:
        if token and set(token) <= set(";&|"):
            commands.append(words)
            words = []
        elif token != "...":
            words.append(token)
    commands.append(words)
    return [c for c in commands if c]


def collect(paths=None):
    """[(doc, line, words)]: every simple command of the docs' shell blocks, and
    [(doc, line, text, error)] for lines that mention a script but cannot be split."""
    commands, unsplittable = [], []
    for path in doc_files() if paths is None else paths:
        doc = os.path.relpath(path, ROOT) if path.startswith(ROOT + os.sep) else path
        for number, text in shell_lines(path):
            try:
                split = simple_commands(text)
            except ValueError as e:
                if any(s in text for s in SCRIPTS + ("tools/",)):
                    unsplittable.append((doc, number, text, f"cannot split it as a shell line: {e}"))
                continue
            commands += [(doc, number, words) for words in split]
    return commands, unsplittable


# ---- checking ------------------------------------------------------------------------------

def quietly(fn, *args):
    """None if fn(*args) returns (or --help exits 0); else the error, in a line."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            fn(*args)
    except SystemExit as e:
        if e.code in (0, None):
            return None
        return err.getvalue().strip() or f"exit status {e.code}"
    except Exception as e:  # noqa: BLE001: a UsageError, or anything else the flags provoke
        return f"{type(e).__name__}: {e}"
    return None


def check_train(argv):
    import train

    def parse_and_check(argv):
        train.check(train.parse_args(argv)[1])
    return quietly(parse_and_check, argv)


def check_bench(argv):
    import bench
    cut = argv.index("--") if "--" in argv else len(argv)

    def dry_run(argv):
        code = bench.main(argv)
        if code:
            raise SystemExit(code)
    return quietly(dry_run, argv[:cut] + ["--dry-run"] + argv[cut:])


def check_script(name, extra=()):
    def check(argv):
        module = importlib.import_module(name)
        if hasattr(module, "parse_args"):
            return quietly(module.parse_args, list(argv) + list(extra))
        if hasattr(module, "parser"):
            return quietly(lambda a: module.parser().parse_args(a), list(argv))
        return f"{name}.py: no command line (it defines neither parse_args nor parser() to check the flags against)"
    return check


CHECKS = {"train.py": check_train, "bench.py": check_bench, "sample.py": check_script("sample"),
          "metrics.py": check_script("metrics", ["--device", "cpu"]), "plot.py": check_script("plot")}


def tool_usage(path):
    """({option: None (no value) | [choices] | [] (any value)}, wraps a command?, the usage
    line): read off the script's `usage: tools/x.sh ...` line, else its first comment
    line that shows it run."""
    rel = os.path.relpath(path, ROOT)
    with open(path, errors="replace") as f:
        src = f.read()
    m = (re.search(r"usage:\s*" + re.escape(rel) + r"\b([^\n\"']*)", src)
         or re.search(r"^#\s+" + re.escape(rel) + r"\b([^\n]*)", src, re.M))
    usage = (m.group(1) if m else "").split("#")[0].strip()
    options = {}
    for flag, value in re.findall(r"\[(--?[\w-]+)(?:\s+([^\]]*))?\]", usage):
        options[flag] = None if not value else value.split("|") if "|" in value else []
    return options, bool(re.search(r"\bcommand\b", usage)), f"{rel} {usage}".strip()


def check_tool(words, aliases):
    """[(script, error)] for a tools/ script and, where it wraps one, its command."""
    name = os.path.normpath(words[0])
    path = os.path.join(ROOT, name)
    if not os.path.isfile(path):
        return [(name, f"no such script: {name}")]
    if not name.endswith(".sh"):
        return [(name, None)]
    options, wraps, usage = tool_usage(path)
    i = 1
    while i < len(words) and words[i].startswith("-"):
        flag, _, value = words[i].partition("=")
        if flag not in options:
            return [(name, f"{flag}: not an option of {name} (usage: {usage})")]
        if options[flag] is None:
            i += 1
            continue
        if not value:
            if i + 1 >= len(words):
                return [(name, f"{flag} needs a value (usage: {usage})")]
            value, i = words[i + 1], i + 1
        if options[flag] and value not in options[flag]:
            return [(name, f"{flag} {value}: choose {', '.join(options[flag])} (usage: {usage})")]
        i += 1
    if not wraps:
        return [(name, None)]
    if i == len(words):
        return [(name, f"{name} runs a command; none given (usage: {usage})")]
    return [(name, None)] + check_words(words[i:], aliases)


def check_torchrun(argv, aliases):
    """argv: torchrun's arguments (its options, the script, the script's arguments)."""
    from torch.distributed.run import get_args_parser
    parsed = {}

    def parse(argv):
        parsed["args"] = get_args_parser().parse_args(argv)
    error = quietly(parse, argv)
    if error:
        return [("torchrun", error)]
    args = parsed["args"]
    if args.module or args.no_python:
        return [("torchrun", None)]
    return check_script_call(args.training_script, args.training_script_args, aliases, via="torchrun")


def check_script_call(script, argv, aliases, via=None):
    name = os.path.normpath(script)
    label = f"{via} {name}" if via else name
    if name in CHECKS:
        return [(label, CHECKS[name](list(argv)))]
    if name.startswith("tools" + os.sep):
        return [(label, err) for _, err in check_tool([name, *argv], aliases)]
    return []  # not one of the project's scripts


def check_python(words, aliases):
    i = 1
    while i < len(words) and words[i].startswith("-"):
        if words[i] == "-c":
            return []
        if words[i] == "-m":
            module = words[i + 1] if i + 1 < len(words) else ""
            if module == "torch.distributed.run":
                return check_torchrun(words[i + 2:], aliases)
            return []  # pytest, pip, ...: not the project's scripts
        i += 2 if words[i] in ("-X", "-W") else 1
    return check_script_call(words[i], words[i + 1:], aliases) if i < len(words) else []


def fill(word, aliases):
    """A word with its placeholder filled, or the source of a file an earlier cp made."""
    if word in PLACEHOLDERS:
        return PLACEHOLDERS[word]
    if re.fullmatch(r"[A-Z][A-Z0-9_]*|<[^<>\s]+>", word):
        return OTHER_PLACEHOLDER
    flag, eq, value = word.partition("=")
    if eq and flag.startswith("-"):
        return flag + "=" + fill(value, aliases)
    if word in aliases and not os.path.exists(os.path.join(ROOT, word)):
        return aliases[word]
    return word


def check_words(words, aliases):
    """[(script, error or None)] for one simple command; [] if it runs none of the
    project's scripts. `aliases`: {DST: SRC} of the doc's cp commands so far (updated)."""
    while words and (re.match(r"[A-Za-z_][A-Za-z0-9_]*=", words[0]) or words[0] == "env"):
        words = words[1:]
    if not words:
        return []
    head = words[0]
    if head == "cp" and len(words) >= 3 and not words[1].startswith("-"):
        src, dst = words[-2], words[-1]
        aliases[os.path.join(dst, os.path.basename(src)) if dst.endswith("/") else dst] = src
        return []
    words = [head] + [fill(w, aliases) for w in words[1:]]
    if head in ("bash", "sh") and len(words) > 1 and words[1].endswith(".sh"):
        words, head = words[1:], words[1]
    base = os.path.basename(head)
    if re.fullmatch(r"python(\d+(\.\d+)?)?", base):
        return check_python(words, aliases)
    if base == "torchrun":
        return check_torchrun(words[1:], aliases)
    if os.path.normpath(head).startswith("tools" + os.sep):
        return check_tool(words, aliases)
    if os.path.normpath(head) in CHECKS:  # ./train.py
        return check_script_call(head, words[1:], aliases)
    return []


@functools.lru_cache(maxsize=None)
def check_docs(paths=None):
    """(checked, failures): checked [(doc, line, command, script, words)]; failures the
    lines saying where, what and why. Once per session (train.py's parser reads each
    Config's source for its help, ~30 ms a command)."""
    commands, unsplittable = collect(paths)
    checked, failures = [], [f"{d}:{n}: {t}\n    {e}" for d, n, t, e in unsplittable]
    aliases = {}
    last_doc = None
    for doc, number, words in commands:
        if doc != last_doc:
            aliases, last_doc = {}, doc
        command = shlex.join(words)
        for script, error in check_words(words, aliases):
            checked.append((doc, number, command, script, words))
            if error:
                said = "" if error.startswith(script.split()[-1] + ":") else script + ": "
                failures.append(f"{doc}:{number}: {command}\n    {said}{error}")
    return checked, failures


# ---- the tests -----------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def at_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # the docs' paths are the repository root's


def test_every_documented_command_parses():
    checked, failures = check_docs()
    assert not failures, (f"{len(failures)} of the docs' {len(checked)} commands no longer parse "
                          f"(fix the doc or the script):\n" + "\n".join(failures))


def test_the_collector_finds_the_commands():
    checked, _ = check_docs()
    assert len(checked) >= MIN_COMMANDS, f"only {len(checked)} commands found in the docs: {checked}"
    readme_train = [c for c in checked if c[0] == "README.md" and c[3].endswith("train.py")]
    assert readme_train, "no train.py command found in README.md"


def renamed(words, old=None, new=None):
    """words with the flag `old` (default: the first --flag) renamed `new` (default: old
    + "-renamed"), or None if it has no such flag."""
    out, done = [], False
    for w in words:
        flag, eq, value = w.partition("=")
        if not done and (flag == old if old else flag.startswith("--") and len(flag) > 2):
            w, done = (new or flag + "-renamed") + eq + value, True
        out.append(w)
    return out if done else None


def documented(script, flag=None):
    """The first doc command that runs `script` (a script, "torchrun" or a tools/ path)
    and has a --flag (`flag`, if given): (doc, line, words)."""
    for doc, number, _, ran, words in check_docs()[0]:
        if (ran == script or ran.endswith(" " + script) or ran.startswith(script + " ")) and renamed(words, flag):
            return doc, number, words
    return None


def test_a_renamed_flag_fails():
    """The test of the test: a real train.py command of the docs, passing as it stands,
    with --max-time renamed --max-seconds (or, if no command has --max-time, its first
    flag renamed) is reported, naming the flag."""
    found = documented("train.py", "--max-time")
    old, new = ("--max-time", "--max-seconds") if found else (None, None)
    found = found or documented("train.py")
    assert found, "no documented train.py command with a flag to rename"
    doc, number, words = found
    assert all(e is None for _, e in check_words(list(words), {})), (doc, number, words)
    bad = renamed(words, old, new)
    new = new or next(w for w in bad if w.endswith("-renamed"))
    results = check_words(bad, {})
    assert any(e and new in e for _, e in results), (doc, number, bad, results)


@pytest.mark.parametrize("script", ["train.py", "bench.py", "sample.py", "metrics.py", "torchrun",
                                    "tools/other_cpu.sh"])
def test_a_renamed_flag_fails_for_each_kind(script):
    """Each kind of documented command, its first --flag renamed, is reported."""
    found = documented(script)
    if found is None:
        pytest.skip(f"the docs show no {script} command with a flag")
    doc, number, words = found
    results = check_words(renamed(words), {})
    assert any(e for _, e in results), (doc, number, renamed(words), results)


def test_a_bad_value_fails():
    """A documented train.py command whose --preset names none of the model's presets is
    reported (train.parse_args's UsageError, not argparse's exit)."""
    found = documented("train.py", "--preset")
    assert found, "no documented train.py command with --preset"
    words = [w + "-nonesuch" if i and found[2][i - 1] == "--preset" else w for i, w in enumerate(found[2])]
    assert any(e for _, e in check_words(words, {})), words


def test_the_collector_reads_blocks_as_a_shell_would(tmp_path):
    """Which blocks count, continuations, prompts, VAR=value prefixes, wrappers and
    placeholders; each failure names the file, the line and the command."""
    doc = tmp_path / "doc.md"
    doc.write_text("""\
```python
python train.py --no-such-flag-in-python-block
```
```text
python train.py --no-such-flag-in-text-block
```
```bash
pip install -r requirements.txt && python train.py --model gpt --preset tiny \\
    --max-time 300 --seed S   # fine
ATEN_CPU_CAPABILITY=avx2 python train.py --model vae --max-seconds 300
```
```console
$ python sample.py --ckpt out/gpt/ckpt.pt --top-kk 5
sample output, python train.py --not-a-command
$ torchrun --standalone --nproc_per_node 2 train.py --model gpt --lr -1
```
  ```
  tools/other_cpu.sh --isa avx3 python metrics.py --ckpt x.pt
  tools/other_cpu.sh --threads 2 python bench.py train --models gpt:tiny -- --batch-sise 8
  python metrics.py --ckpt out/<model>/ckpt.pt [--features auto|classifier|inception]
  tools/no_such_tool.sh
  ```
""")
    checked, failures = check_docs((str(doc),))
    where = [f.split(" ", 1)[0] for f in failures]
    assert where == [f"{doc}:{n}:" for n in (10, 13, 15, 18, 19, 21)], failures
    assert "--max-seconds" in failures[0] and "python train.py --model vae --max-seconds 300" in failures[0]
    assert "--top-kk" in failures[1] and "--lr" in failures[2]
    assert "--isa avx3" in failures[3] and "--batch-sise" in failures[4] and "no such script" in failures[5]
    assert len(checked) == 9, checked
