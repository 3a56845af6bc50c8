"""Every flag of train.py, each given a hostile value as a new user might (nan, inf, -1,
0, a huge number, a wrong-type word, the empty string), on top of a tiny run: the run
either trains (exit 0) or is refused with one line on stderr (exit 2), never a
traceback, a hang or another exit code.

The fields are read from train.TrainConfig and each model's Config with
dataclasses.fields, so a field added later is walked without a change here. The runs
are in this process (train.py's own entry, cli.cli(train.main)), so a refused value
costs milliseconds; those that train are tiny (one step of a model a few kB big).
"""
import contextlib
import dataclasses
import importlib
import io
import signal
import traceback
import warnings

import pytest

import train

MODELS = ("gpt", "diffusion", "vae", "gan")
# Each model's smallest settings, on its default data (pystdlib for gpt, digits for the
# others); one step, one evaluation batch, few samples.
TINY = {
    "gpt": ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16"],
    "diffusion": ["--base", "8", "--mults", "1,2", "--attn-res", "14", "--timesteps", "10", "--sample-steps", "2"],
    "vae": ["--width", "8", "--z-dim", "4", "--prior-components", "2"],
    "gan": ["--width", "8", "--z-dim", "8"],
}
RUN = ["--preset", "tiny", "--max-iters", "1", "--max-time", "2", "--eval-iters", "1", "--eval-interval", "1",
       "--log-interval", "1", "--batch-size", "4", "--sample-images", "4", "--sample-tokens", "8", "--dtype", "fp32",
       "--out-dir", "out"]
HOSTILE = ["nan", "inf", "-1", "0", str(10 ** 12), str(2 ** 64), "1e30", "abc", ""]
# Values left out per type, and why:
#   float: 10**12 and 2**64 are, as floats, the huge number that 1e30 already is;
#   str: a field of text names something (a file, a dataset, a device): "nan", "inf", "-1",
#        "0" and the numbers are names just as "abc" is, which stands for all of them.
SKIP = {float: {str(10 ** 12), str(2 ** 64)}, str: {"nan", "inf", "-1", "0", str(10 ** 12), str(2 ** 64), "1e30"}}
# stderr lines that are not errors: data.py's progress (tokenizing, rendering the digits).
PROGRESS = ("data: ",)
PER_RUN_S = 120  # a run that takes longer has hung (the slowest that trains take seconds)


class Hung(Exception):
    pass


def run(argv):
    """(exit code, stderr) of `python train.py *argv`, in this process."""
    err = io.StringIO()

    def hung(signum, frame):
        raise Hung(f"no end after {PER_RUN_S} s")

    before = signal.signal(signal.SIGALRM, hung)
    signal.alarm(PER_RUN_S)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err), warnings.catch_warnings():
            # warnings printed as a user would see them (pytest would otherwise collect them)
            warnings.simplefilter("default")
            warnings.showwarning = lambda m, c, f, n, file=None, line=None: err.write(
                warnings.formatwarning(m, c, f, n, line))
            try:
                train.cli(train.main, argv)  # what `python train.py` runs; it always exits
                code = None
            except SystemExit as e:
                code = e.code
            except BaseException:  # noqa: BLE001 -- what a user would see as a traceback
                traceback.print_exc(file=err)
                code = "traceback"
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, before)
    return code, err.getvalue()


def values(f):
    """The hostile values for field f, each as the flag's arguments."""
    flag = "--" + f.name.replace("_", "-")
    kind = bool if isinstance(f.default, bool) else type(f.default)
    return [[flag, v] for v in HOSTILE if v not in SKIP.get(kind, ())]


def walk(model, fields, shared_data, tmp_path, monkeypatch):
    """Run every hostile value of every field; -> (outcomes {"trains": n, "refused": n}, failures)."""
    outcomes, failures = {"trains": 0, "refused": 0}, []
    for i, f in enumerate(fields):
        for j, flag in enumerate(values(f)):
            case = tmp_path / f"{i}-{j}"
            case.mkdir()
            monkeypatch.chdir(case)  # relative paths a value makes (--out-dir abc) land here
            code, err = run(["--model", model, *TINY[model], *RUN, "--data-dir", shared_data, *flag])
            lines = [line for line in err.strip().splitlines() if not line.startswith(PROGRESS)]
            if code == 0 and "Traceback" not in err:
                outcomes["trains"] += 1
            elif code == 2 and len(lines) == 1 and "Traceback" not in err:
                outcomes["refused"] += 1
            else:
                failures.append(f"{' '.join(flag)!r}: exit {code}, stderr:\n" + "\n".join(lines[-6:]))
    print(f"\n{model}: {outcomes}")
    return outcomes, failures


@pytest.mark.parametrize("model", MODELS)
def test_every_model_flag_trains_or_is_refused_in_one_line(model, shared_data, tmp_path, monkeypatch):
    fields = dataclasses.fields(importlib.import_module(model).Config)
    outcomes, failures = walk(model, fields, shared_data, tmp_path, monkeypatch)
    assert not failures, f"--model {model}:\n" + "\n\n".join(failures)
    assert outcomes["refused"] > outcomes["trains"] > 0, outcomes


@pytest.mark.parametrize("model", [pytest.param(m, marks=[] if m == "gpt" else pytest.mark.slow) for m in MODELS])
def test_every_training_flag_trains_or_is_refused_in_one_line(model, shared_data, tmp_path, monkeypatch):
    # gpt's runs are the fastest; the image models' (digits rendered again for --data-dir
    # abc, samples drawn) are the slow walk
    outcomes, failures = walk(model, dataclasses.fields(train.TrainConfig), shared_data, tmp_path, monkeypatch)
    assert not failures, f"--model {model}:\n" + "\n\n".join(failures)
    assert outcomes["refused"] > outcomes["trains"] > 0, outcomes


def test_values_the_optimizer_or_the_sampler_would_raise_on_are_one_line(shared_data, tmp_path, monkeypatch):
    # unchecked, --lr nan and --beta2 1.5 raise in the optimizer's constructor, --lr inf in
    # torch.multinomial while sampling from wrecked weights
    monkeypatch.chdir(tmp_path)
    for flag, says in ((["--lr", "nan"], "--lr: invalid value 'nan'"),
                       (["--beta2", "1.5"], "--beta2 1.5 is too large: it must be below 1"),
                       (["--lr", "inf"], "--lr: invalid value 'inf'"),
                       (["--lr", "1e30"], "--lr 1e+30 is too large: it must be at most 1000")):
        code, err = run([*TINY["gpt"], *RUN, "--data-dir", shared_data, *flag])
        lines = [line for line in err.strip().splitlines() if not line.startswith(PROGRESS)]
        assert code == 2 and len(lines) == 1 and says in lines[0], err
