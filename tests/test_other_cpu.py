"""tools/other_cpu.sh, which .ci/run uses to run the summation-order tests as another
CPU computes them: it must really lower torch's instruction set and thread count, and
refuse a set this CPU cannot run."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = "import torch; print(torch.backends.cpu.get_cpu_capability(), torch.get_num_threads())"
LEVEL = {"DEFAULT": 0, "AVX2": 1, "AVX512": 2}


# this CPU as it is (the suite itself may run under the tool)
ENV = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "OMP_NUM_THREADS")}
ENV["PATH"] = os.path.dirname(sys.executable) + os.pathsep + ENV.get("PATH", "")  # this python first


def tool(*argv):
    return subprocess.run(["bash", os.path.join(ROOT, "tools", "other_cpu.sh"), *argv], capture_output=True,
                          text=True, timeout=120, env=ENV)


def test_other_cpu_lowers_the_instruction_set_and_threads():
    native = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=ENV).stdout.split()[0]
    r = tool(sys.executable, "-c", PROBE)
    assert r.returncode == 0, r.stderr
    isa, threads = r.stdout.split()
    assert threads == "1"
    if native in ("AVX2", "AVX512"):  # x86 with vectors: the next set down
        assert LEVEL[isa] == LEVEL[native] - 1, (native, isa)
    r = tool("--isa", "default", "--threads", "2", sys.executable, "-c", PROBE)
    assert r.returncode == 0 and r.stdout.split() == ["DEFAULT", "2"], r.stderr
    for bad in (["--isa", "avx9"], ["--threads", "0"], ["--isa"]):
        r = tool(*bad, "true")
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, (bad, r.stderr)
    if native != "AVX512":  # a set above this CPU's would not run: refused
        r = tool("--isa", "avx512-bf16", "true")
        assert r.returncode == 2 and "cannot run it" in r.stderr
