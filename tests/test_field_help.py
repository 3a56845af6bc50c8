"""A Config field's --help is its comment and the comment lines directly below it, in the
layout the file was written in and in the layouts black and ruff format it to."""
import os
import subprocess
import sys

import cli
import contract

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The aligned layout of this project's files: continuation comments in the column of the
# first comment.
ALIGNED = '''
from dataclasses import dataclass


@dataclass
class Config:
    n_layer: int = 4                # Transformer blocks
    dropout: float = 0.0            # dropout on attention and MLP outputs, in training only;
                                    # 0 for short runs
    mults: tuple = (1, 2, 4)        # channel multiplier per resolution; each level
                                    # halves the size
    name: str = "x"                 # a name

    # the next fields: a heading after a blank line is no field's help
    bias: bool = True
'''

# The same class as black and ruff lay it out (written out here, so the test needs neither):
# two spaces before the #, continuation comments moved to the block's indent.
BLACK = '''
from dataclasses import dataclass


@dataclass
class Config:
    n_layer: int = 4  # Transformer blocks
    dropout: float = 0.0  # dropout on attention and MLP outputs, in training only;
    # 0 for short runs
    mults: tuple = (1, 2, 4)  # channel multiplier per resolution; each level
    # halves the size
    name: str = "x"  # a name

    # the next fields: a heading after a blank line is no field's help
    bias: bool = True
'''

# A line too long for the formatter, split inside the parentheses of its default, with a
# comment on the first and on the last of its lines.
SPLIT = '''
from dataclasses import dataclass


@dataclass
class Config:
    mults: tuple = (  # channel multiplier per resolution;
        1,
        2,
        4,
    )  # each level
    # halves the size
'''

WANT = {"n_layer": "Transformer blocks",
        "dropout": "dropout on attention and MLP outputs, in training only; 0 for short runs",
        "mults": "channel multiplier per resolution; each level halves the size",
        "name": "a name", "bias": ""}


def config_from(source, tmp_path, name):
    path = tmp_path / f"{name}.py"
    path.write_text(source + "\n\nclass Model:\n    def sample(self, n, y=None):\n        pass\n")
    return contract.load_module(str(path)).Config


def test_help_is_the_same_in_every_layout(tmp_path):
    for name, source in (("aligned", ALIGNED), ("black", BLACK)):
        assert cli.field_help(config_from(source, tmp_path, name)) == WANT, name
    assert cli.field_help(config_from(SPLIT, tmp_path, "split")) == {"mults": WANT["mults"]}


def test_the_projects_configs_keep_their_help_when_reformatted(tmp_path):
    """Every field of the project's Configs has help, and the black layout of each model
    file (its comments moved as black moves them, written out in the test) gives the same."""
    import train
    for module in ("gpt", "diffusion", "vae", "gan"):
        mod = contract.load_module(module)
        aligned = cli.field_help(mod.Config)
        assert all(aligned.get(f) for f in mod.Config.__dataclass_fields__), module
        with open(os.path.join(ROOT, f"{module}.py")) as f:
            source = f.read()
        assert cli.field_help(config_from(to_black(source), tmp_path, module + "_black")) == aligned, module
    assert all(cli.field_help(train.TrainConfig).values())


def to_black(source):
    """black's layout of comments: one space-pair before a trailing #, and a comment-only
    line at the indent of the code around it (the continuations of a field's help)."""
    out = []
    for line in source.splitlines():
        code, hash_, comment = line.partition("#")
        if hash_ and code.strip() and '"' not in code and "'" not in code:
            line = code.rstrip() + "  #" + comment
        elif hash_ and not code.strip() and out:
            indent = len(out[-1]) - len(out[-1].lstrip())
            line = " " * indent + "#" + comment
        out.append(line)
    return "\n".join(out) + "\n"


def test_black_itself_agrees_where_installed(tmp_path):
    """Where black is installed, its real output of a model file gives the same help."""
    try:
        import black  # noqa: F401
    except ImportError:
        import pytest
        pytest.skip("black is not installed (pip install black to run this)")
    for module in ("gpt", "diffusion", "vae", "gan"):
        path = tmp_path / f"{module}_formatted.py"
        with open(os.path.join(ROOT, f"{module}.py")) as f:
            path.write_text(f.read())
        subprocess.run([sys.executable, "-m", "black", "-q", str(path)], check=True)
        assert cli.field_help(contract.load_module(str(path)).Config) == \
            cli.field_help(contract.load_module(module).Config), module
