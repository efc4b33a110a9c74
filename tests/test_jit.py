"""The kernel cache (src/batchnorm/_jit.py): what it loads, what it refuses, what it cleans
up, how it runs the compiler, and what kernels_status() says.

Each scenario runs in a fresh process with its own BATCHNORM_CACHE, so that a library that
is loaded (or must never be) is loaded there, not into the test runner. Builds use
CC='<cc> -O0' (about a second; and CC's words are then honoured on every build here).
Files "of another user" are chowned to OTHER_UID, which needs root (those cases skip
otherwise) and are given back afterwards."""

import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from batchnorm import _jit

OTHER_UID = 54321  # plays another user: owns nothing on this machine

# Runs in the child: loads the kernels with _jit.py alone (it needs nothing but the standard
# library, and a child that imports torch takes seconds to start), calls one on a small
# (N, C, S) float32 tensor, and prints what happened as JSON on its last line.
PROBE = textwrap.dedent(f"""
    import ctypes, importlib.util, json, random
    spec = importlib.util.spec_from_file_location("bn_jit_probe", {_jit.__file__!r})
    jit = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(jit)
    lib = jit.kernels()
    works = None
    if lib is not None:
        n, c, s = 4, 3, 50
        rnd = random.Random(0)
        x = (ctypes.c_float * (n * c * s))(*[rnd.gauss(5.0, 3.0) for _ in range(n * c * s)])
        mean, var = (ctypes.c_double * c)(), (ctypes.c_double * c)()
        args = jit.StatsArgs(x=ctypes.addressof(x), mean=ctypes.addressof(mean), var=ctypes.addressof(var),
                             n=n, c=c, s=s, cl=0, nt=1)
        works = lib.bn_stats_f32(args) == 0
        for k in range(c):
            v = [x[(i * c + k) * s + j] for i in range(n) for j in range(s)]
            mu = sum(v) / len(v)
            sigma2 = sum((t - mu) ** 2 for t in v) / len(v)
            works = works and abs(mean[k] - mu) < 1e-4 and abs(var[k] - sigma2) < 1e-4 * sigma2
    print(json.dumps({{"loaded": lib is not None, "works": works, "status": jit.status(), "info": jit._info}}))
""")

# The same through the package, with torch: the status batchnorm.kernels_status() reports,
# and BatchNorm2d on a size that takes the kernels agrees with torch.nn.
TORCH_PROBE = textwrap.dedent("""
    import json, torch, batchnorm as bn
    from batchnorm import _jit
    x = torch.randn(8, 8, 24, 24)
    torch.testing.assert_close(bn.BatchNorm2d(8)(x), torch.nn.functional.batch_norm(x, None, None, training=True),
                               rtol=1e-5, atol=1e-5)
    lib = _jit.kernels()
    print(json.dumps({"loaded": lib is not None, "works": lib is not None, "status": bn.kernels_status(),
                      "info": _jit._info}))
""")


def _cc() -> str:
    cc = _jit._compiler()
    if cc is None:
        pytest.skip("no C compiler on this machine")
    return cc


def _need_root():
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("creating files owned by another user needs root")


def _env(cache, **extra):
    env = dict(os.environ, BATCHNORM_CACHE=str(cache), CC=f"{shlex.quote(_cc())} -O0")
    env.pop("BATCHNORM_KERNELS", None)
    env.pop("BATCHNORM_CC_TIMEOUT", None)
    if platform.machine() == "x86_64":
        env["BATCHNORM_MARCH"] = "x86-64"  # quicker to build than the best level
    env.update(extra)
    return env


def _spawn(cache, code=PROBE, timeout=300, **extra):
    return subprocess.run([sys.executable, "-c", code], env=_env(cache, **extra), capture_output=True, text=True,
                          timeout=timeout)


def _probe(cache, code=PROBE, **extra):
    out = _spawn(cache, code=code, **extra)
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def _user_dir(cache) -> Path:
    return Path(cache) / f"u{os.geteuid()}"


def _record_matches(so: Path) -> bool:
    digest, name = Path(str(so) + ".sha256").read_text().split()
    return name == so.name and digest == hashlib.sha256(so.read_bytes()).hexdigest()


def _temporaries(directory: Path):
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp")) if directory.exists() else []


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _script(path: Path, body: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


@pytest.fixture
def chown(request):
    """chown(path, uid) that is undone after the test."""
    done = []

    def change(path, uid):
        st = os.lstat(path)
        done.append((path, st.st_uid, st.st_gid))
        os.chown(path, uid, st.st_gid, follow_symlinks=False)

    yield change
    for path, uid, gid in reversed(done):
        if os.path.lexists(path):
            os.chown(path, uid, gid, follow_symlinks=False)


# ---- a fresh build, and the cache afterwards ------------------------------------------------

def test_build_then_cache_with_private_modes(tmp_path):
    # A umask that would make the library unusable to anyone but its owner changes nothing:
    # the modes are set explicitly.
    code = "import os; os.umask(0o077)\n" + TORCH_PROBE
    first = _probe(tmp_path, code=code)
    assert first["loaded"] and first["works"], first["status"]
    assert first["info"]["how"] == "built" and "built now" in first["status"]
    if platform.machine() == "x86_64":  # the level and what the binary itself says it carries
        assert "(x86-64: portable loops, OpenMP; built now)" in first["status"], first["status"]
    so = Path(first["info"]["path"])
    assert so.parent == _user_dir(tmp_path) and so.name in first["status"]
    assert stat.S_IMODE(so.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(so.stat().st_mode) == 0o755
    assert stat.S_IMODE(Path(str(so) + ".sha256").stat().st_mode) == 0o644
    assert _record_matches(so)
    assert sorted(p.name for p in so.parent.iterdir()) == [so.name, so.name + ".sha256"]
    # The cached library, loaded and called by _jit.py alone (no torch import: seconds saved);
    # the package's path to it was checked with the build above.
    second = _probe(tmp_path)
    assert second["works"] and second["info"]["how"] == "cached" and second["info"]["path"] == str(so)
    assert "SHA-256 verified" in second["status"]


def test_processes_starting_together_build_once(tmp_path):
    procs = [subprocess.Popen([sys.executable, "-c", PROBE], env=_env(tmp_path), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, out + err
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert all(r["works"] for r in results)
    assert sorted(r["info"]["how"] for r in results) == ["built", "cached"], [r["status"] for r in results]


# ---- damaged cache files ---------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["truncated to half", "garbage", "garbage with a matching record"])
def test_damaged_library_is_rebuilt_not_loaded(tmp_path, damage):
    # Mapping a truncated library can kill the process with SIGBUS, so the hash is checked
    # before anything is mapped; a garbage file whose record matches is refused by the loader
    # and rebuilt (not a permanent fallback).
    so = Path(_probe(tmp_path)["info"]["path"])
    size = so.stat().st_size
    if damage == "truncated to half":
        with open(so, "r+b") as f:
            f.truncate(size // 2)
    else:
        so.write_bytes(os.urandom(size))
        if damage == "garbage with a matching record":
            Path(str(so) + ".sha256").write_text(f"{hashlib.sha256(so.read_bytes()).hexdigest()}  {so.name}\n")
    after = _probe(tmp_path)
    assert after["loaded"] and after["works"], after["status"]
    assert after["info"]["how"] == "built" and after["info"]["path"] == str(so)
    reason = "could not be loaded" if "matching" in damage else "does not match the SHA-256"
    assert f"cached {so.name}" in after["status"] and reason in after["status"], after["status"]
    assert so.stat().st_size == size and _record_matches(so)
    assert _probe(tmp_path)["info"]["how"] == "cached"


# ---- libraries planted by someone else ---------------------------------------------------------

PLANT_C = r"""
#include <stdio.h>
#include <stdlib.h>
/* Runs when the library is mapped: it must never be. */
__attribute__((constructor)) static void planted(void) {
    const char *path = getenv("BN_PLANT_MARKER");
    FILE *f = path ? fopen(path, "w") : NULL;
    if (f) {
        fputs("planted code ran\n", f);
        fclose(f);
    }
}
"""


@pytest.fixture(scope="module")
def plant(tmp_path_factory):
    """A stealth plant: the real kernels plus a constructor that writes $BN_PLANT_MARKER."""
    d = tmp_path_factory.mktemp("plant")
    (d / "plant.c").write_text(PLANT_C)
    so = d / "plant.so"
    subprocess.run([_cc(), "-O0", "-fPIC", "-shared", "-pthread", "-std=c11", str(d / "plant.c"), _jit._SOURCE,
                    "-o", str(so), "-lm"], check=True, capture_output=True, timeout=300)
    marker = d / "marker"  # the detector works: loading the plant does run its constructor
    subprocess.run([sys.executable, "-c", f"import ctypes; ctypes.CDLL({str(so)!r})"],
                   env=dict(os.environ, BN_PLANT_MARKER=str(marker)), check=True, timeout=60)
    assert marker.read_text() == "planted code ran\n"
    return so


@pytest.fixture(scope="module")
def cache_names(tmp_path_factory):
    """The file names a process with _env() looks up first, best first (computable by anyone)."""
    code = PROBE.split("lib = jit.kernels()")[0] + "print(' '.join(c.name for c in jit._plan()[1]))"
    out = _spawn(tmp_path_factory.mktemp("names"), code=code)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def _place(plant: Path, directory: Path, name: str, mode=0o755, record=True) -> Path:
    """Copy the plant to directory/name with a record of its true hash, as an attacker can."""
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / name
    shutil.copyfile(plant, target)
    target.chmod(mode)
    if record:
        rec = directory / (name + ".sha256")
        rec.write_text(f"{hashlib.sha256(target.read_bytes()).hexdigest()}  {name}\n")
        rec.chmod(0o644)
    return target


PLANTS = {
    # case: (needs root, what the status must say)
    "library of another user": (True, f"owned by uid {OTHER_UID}"),
    "record of another user": (True, f"owned by uid {OTHER_UID}"),
    "group-writable library": (False, "writable by group or others (mode 0775)"),
    "world-writable record": (False, "writable by group or others (mode 0666)"),
    "no record": (False, "no hash record"),
    "symlink to a library with its record": (False, "cannot be opened safely"),
    "directory of another user": (True, f"owned by uid {OTHER_UID}"),
    "group-writable directory": (False, "made private, its files rebuilt"),
    "root of the cache, old location": (False, None),
    "cache root owned by another user": (True, None),
}


@pytest.mark.parametrize("case", list(PLANTS))
def test_planted_library_never_runs(tmp_path, plant, cache_names, chown, case):
    root_needed, says = PLANTS[case]
    if root_needed:
        _need_root()
    cache, user = tmp_path / "cache", _user_dir(tmp_path / "cache")
    name = cache_names[0]
    if case == "library of another user":
        so = _place(plant, user, name)
        chown(so, OTHER_UID)
        chown(str(so) + ".sha256", OTHER_UID)
    elif case == "record of another user":
        chown(str(_place(plant, user, name)) + ".sha256", OTHER_UID)
    elif case == "group-writable library":
        _place(plant, user, name, mode=0o775)
    elif case == "world-writable record":
        so = _place(plant, user, name)
        os.chmod(str(so) + ".sha256", 0o666)
    elif case == "no record":
        _place(plant, user, name, record=False)
    elif case == "symlink to a library with its record":
        elsewhere = _place(plant, tmp_path / "elsewhere", name)
        user.mkdir(parents=True)
        (user / name).symlink_to(elsewhere)
        shutil.copyfile(str(elsewhere) + ".sha256", user / (name + ".sha256"))
    elif case == "directory of another user":
        # e.g. made first in a shared (1777) cache root by someone expecting root to come
        cache.mkdir()
        cache.chmod(0o1777)
        so = _place(plant, user, name)
        user.chmod(0o755)
        for p in (so, str(so) + ".sha256", user):
            chown(p, OTHER_UID)
    elif case == "group-writable directory":
        _place(plant, user, name)
        user.chmod(0o770)
    elif case == "root of the cache, old location":
        _place(plant, cache, name)
    elif case == "cache root owned by another user":
        _place(plant, cache, name)
        chown(cache, OTHER_UID)
    before = sorted(os.listdir(user)) if user.is_dir() else None
    marker = tmp_path / "marker"
    result = _probe(cache, BN_PLANT_MARKER=str(marker))
    assert not marker.exists(), "the planted library ran"
    assert result["loaded"] and result["works"], result["status"]
    assert result["info"]["how"] in ("built", "built, not cached"), result["status"]
    if says is None:
        assert not any("rebuilt" in n or "not used" in n for n in result["info"]["notes"]), result["status"]
    else:
        assert says in result["status"], result["status"]
    if case == "directory of another user":
        assert "cache not used" in result["status"] and result["info"]["how"] == "built, not cached"
        assert sorted(os.listdir(user)) == before  # nothing written into a directory of theirs
        assert not Path(result["info"]["path"]).parent.exists()  # the private build is gone
    else:
        so = Path(result["info"]["path"])
        assert so == user / name
        assert so.stat().st_uid == os.geteuid() and stat.S_IMODE(so.stat().st_mode) == 0o755
        assert not so.is_symlink() and _record_matches(so)
        assert stat.S_IMODE(user.stat().st_mode) & 0o022 == 0
        again = _probe(cache, BN_PLANT_MARKER=str(marker))
        assert again["info"]["how"] == "cached" and not marker.exists()


# ---- the compiler ------------------------------------------------------------------------------

def test_cc_words_are_honoured(tmp_path):
    # A path with a space, quoted in CC, and a flag: CC is split like a shell would, its
    # optimization level replaces ours, and it is the compiler that runs.
    log = tmp_path / "log"
    wrapper = _script(tmp_path / "my cc" / "logcc", f'echo "$@" >> "$BN_CC_LOG"\nexec {shlex.quote(_cc())} "$@"\n')
    result = _probe(tmp_path / "cache", CC=f"{shlex.quote(str(wrapper))} -O0", BN_CC_LOG=str(log))
    assert result["loaded"] and result["works"], result["status"]
    assert result["info"]["compiler"] == [str(wrapper), "-O0"]
    builds = [line for line in log.read_text().splitlines() if "-shared" in line]
    assert builds and all(line.startswith("-O0 ") and "-O3" not in line for line in builds), builds


@pytest.mark.parametrize("cc,says", [("bn-no-such-compiler -O2", "'bn-no-such-compiler' is not a program on PATH"),
                                     ("'gcc -O2", "cannot be split into a command")])
def test_unusable_cc_is_named_and_never_replaced(tmp_path, cc, says):
    result = _probe(tmp_path, CC=cc)
    assert not result["loaded"], result["status"]
    assert says in result["status"] and repr(cc) in result["status"] and "torch operations" in result["status"]
    assert not _user_dir(tmp_path).exists()  # no other compiler built anything


def test_failing_compiler_leaves_no_temporary_files(tmp_path):
    cc = _script(tmp_path / "cc", f'[ "$1" = --version ] && exec {shlex.quote(_cc())} --version\n'
                                  'prev=; for a; do [ "$prev" = -o ] && echo partial > "$a"; prev=$a; done\n'
                                  'echo junk > "$TMPDIR/cc-junk.s"\necho "error: this compiler is broken" >&2\n'
                                  'exit 1\n')
    result = _probe(tmp_path / "cache", CC=str(cc))
    assert not result["loaded"]
    assert result["status"].startswith("build failed") and "this compiler is broken" in result["status"]
    assert os.listdir(_user_dir(tmp_path / "cache")) == []


def test_hung_compiler_times_out_and_is_killed(tmp_path):
    # The compiler answers --version, then hangs in the build with a child of its own holding
    # the output pipes: both are killed after BATCHNORM_CC_TIMEOUT and training goes on.
    pids = tmp_path / "pids"
    cc = _script(tmp_path / "cc", f'[ "$1" = --version ] && exec {shlex.quote(_cc())} --version\n'
                                  'sleep 300 &\necho $! >> "$BN_PIDS"\necho $$ >> "$BN_PIDS"\nwait\n')
    start = time.monotonic()
    result = _probe(tmp_path / "cache", CC=str(cc), BATCHNORM_CC_TIMEOUT="2", BN_PIDS=str(pids))
    assert time.monotonic() - start < 120
    assert not result["loaded"]
    assert "timed out after 2 s (BATCHNORM_CC_TIMEOUT)" in result["status"], result["status"]
    assert result["status"].startswith("build failed")
    started = [int(p) for p in pids.read_text().split()]
    assert len(started) == 2 and not any(_alive(p) for p in started)
    assert os.listdir(_user_dir(tmp_path / "cache")) == []


def test_killed_build_is_swept_by_the_next_one(tmp_path):
    # SIGKILL in the middle of a build leaves its temporary directory; the next build removes
    # it once it is stale, and leaves a recent one (a build in progress elsewhere) alone.
    cache, user = tmp_path / "cache", _user_dir(tmp_path / "cache")
    cc = _script(tmp_path / "cc", f'[ "$1" = --version ] && exec {shlex.quote(_cc())} --version\n'
                                  'echo partial > "$TMPDIR/cc-partial.o"\nkill -9 $PPID\nsleep 5\nexit 1\n')
    out = _spawn(cache, CC=str(cc))
    assert out.returncode == -signal.SIGKILL
    left = _temporaries(user)
    assert len(left) == 1 and os.listdir(user / left[0]) == ["cc-partial.o"]
    old = time.time() - 2 * _jit._STALE
    os.utime(user / left[0], (old, old))
    (user / "bnkernels-0123456789abcdef.recent.tmp").mkdir()
    result = _probe(cache)
    assert result["works"] and result["info"]["how"] == "built"
    assert _temporaries(user) == ["bnkernels-0123456789abcdef.recent.tmp"]


# ---- in this process: the pieces -----------------------------------------------------------------

@pytest.mark.parametrize("failure", ["timeout", "interrupt"])
def test_compiler_process_group_is_killed(tmp_path, failure):
    pids = tmp_path / "pids"
    argv = ["sh", "-c", f'sleep 300 & echo $! >> {pids}; echo $$ >> {pids}; wait']
    if failure == "timeout":
        with pytest.raises(_jit._Fallback, match="timed out"):
            _jit._run(argv, time.monotonic() + 1)
    else:
        # A process started in the background by a non-interactive shell ignores SIGINT
        # (and Python then keeps it ignored): install Python's handler for this test.
        previous = signal.signal(signal.SIGINT, signal.default_int_handler)
        timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT))
        timer.start()
        try:
            with pytest.raises(KeyboardInterrupt):
                _jit._run(argv, time.monotonic() + 60)
        finally:
            timer.cancel()
            signal.signal(signal.SIGINT, previous)
    started = [int(p) for p in pids.read_text().split()]
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in started) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(started) == 2 and not any(_alive(p) for p in started)


@pytest.mark.parametrize("failure", ["OSError moving the library", "KeyboardInterrupt while hashing"])
def test_build_removes_its_temporary_directory_on_exceptions(tmp_path, monkeypatch, failure):
    cc = [_cc(), "-O0"]
    cand = _jit._candidates(cc, "test")[0][-1]  # the last resort: lowest level, no OpenMP
    d = tmp_path / "u"
    d.mkdir(mode=0o700)
    if failure.startswith("OSError"):
        def boom(*args, **kwargs):
            raise OSError("no space left on device")
        monkeypatch.setattr(_jit.os, "replace", boom)
        expected = OSError
    else:
        def boom(fd):
            raise KeyboardInterrupt
        monkeypatch.setattr(_jit, "_sha256", boom)
        expected = KeyboardInterrupt
    dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(expected):
            _jit._build(dfd, str(d), cc, cand, time.monotonic() + 300)
    finally:
        os.close(dfd)
    assert os.listdir(d) == []


def test_invalid_timeout_is_reported(monkeypatch):
    monkeypatch.setenv("BATCHNORM_CC_TIMEOUT", "soon")
    seconds, notes = _jit._timeout()
    assert seconds == _jit._TIMEOUT and "BATCHNORM_CC_TIMEOUT='soon'" in notes[0]
    monkeypatch.setenv("BATCHNORM_CC_TIMEOUT", "7.5")
    assert _jit._timeout() == (7.5, [])


# ---- the instruction set, chosen when loading ------------------------------------------------------

BASE_CPU = "fpu cx8 cmov mmx fxsr sse sse2 syscall nx lm".split()
V2_CPU = BASE_CPU + "pni ssse3 cx16 sse4_1 sse4_2 popcnt lahf_lm".split()
V3_CPU = V2_CPU + "fma movbe xsave avx f16c abm bmi1 avx2 bmi2".split()
V4_CPU = V3_CPU + "avx512f avx512dq avx512cd avx512bw avx512vl".split()
LEVELS = ["x86-64-v4", "x86-64-v3", "x86-64-v2", "x86-64"]


@pytest.fixture
def fake_cpu(monkeypatch):
    """fake_cpu(flags): make _jit see an x86-64 CPU with these /proc/cpuinfo flags."""
    monkeypatch.delenv("BATCHNORM_MARCH", raising=False)
    monkeypatch.setattr(_jit, "_is_x86_64", lambda: True)

    def use(flags):
        monkeypatch.setattr(_jit, "_cpu_flags", lambda: None if flags is None else list(flags))
    return use


@pytest.mark.parametrize("cpu,best", [(V4_CPU + ["amx_tile", "avx512_fp16"], "x86-64-v4"), (V3_CPU, "x86-64-v3"),
                                      ([f for f in V3_CPU if f != "fma"], "x86-64-v2"), (V2_CPU, "x86-64-v2"),
                                      (BASE_CPU, "x86-64"), (None, "x86-64")],
                         ids=["v4", "v3", "v3 without FMA", "v2", "baseline", "unreadable"])
def test_best_level_the_cpu_supports_is_chosen(fake_cpu, cpu, best):
    fake_cpu(cpu)
    levels, notes, key_cpu = _jit._levels()
    # the best level first, the lower ones after it for a compiler that rejects it
    assert [name for name, _ in levels] == LEVELS[LEVELS.index(best):]
    assert levels[0][1][0] == f"-march={best}" and notes == [] and key_cpu == ""


def test_cache_key_carries_no_cpu_flags(fake_cpu, monkeypatch):
    # Two AVX-512 machines with different extensions share their builds; an AVX2 machine
    # builds its own, the very file an AVX-512 machine uses when told x86-64-v3.
    cc = ["/usr/bin/cc"]
    fake_cpu(V4_CPU)
    v4 = [c.name for c in _jit._candidates(cc, "v")[0]]
    fake_cpu(V4_CPU + ["avx512_vnni", "amx_int8", "vaes"])
    assert [c.name for c in _jit._candidates(cc, "v")[0]] == v4
    fake_cpu(V3_CPU)
    v3 = [c.name for c in _jit._candidates(cc, "v")[0]]
    assert v3 == v4[2:]
    fake_cpu(V4_CPU)
    monkeypatch.setenv("BATCHNORM_MARCH", "x86-64-v3")
    assert [c.name for c in _jit._candidates(cc, "v")[0]] == v3[:2]


def test_march_override(fake_cpu, monkeypatch):
    fake_cpu(V3_CPU)
    monkeypatch.setenv("BATCHNORM_MARCH", "x86-64-v4")  # this CPU cannot run it: refused, said so
    levels, notes, _ = _jit._levels()
    assert levels[0][0] == "x86-64-v3"
    assert "BATCHNORM_MARCH=x86-64-v4 refused, this CPU lacks avx512f" in notes[0]
    monkeypatch.setenv("BATCHNORM_MARCH", "x86-64")  # asked for: that level only, never another
    assert _jit._levels()[:2] == ([("x86-64", ["-march=x86-64"])], ["level set by BATCHNORM_MARCH=x86-64"])
    monkeypatch.setenv("BATCHNORM_MARCH", "znver4")
    levels, notes, key_cpu = _jit._levels()
    assert levels == [("-march=znver4", ["-march=znver4"])] and "not checked" in notes[0] and key_cpu == ""
    monkeypatch.setenv("BATCHNORM_MARCH", "native")  # only this CPU's flags make such a build shareable
    levels, _, key_cpu = _jit._levels()
    assert levels == [("native", ["-march=native"])] and key_cpu == " ".join(V3_CPU)
    native_v3 = _jit._candidates(["/usr/bin/cc"], "v")[0][0].name
    fake_cpu(V4_CPU)
    assert _jit._candidates(["/usr/bin/cc"], "v")[0][0].name != native_v3


def test_other_architectures_build_for_the_compiler_default(monkeypatch):
    monkeypatch.delenv("BATCHNORM_MARCH", raising=False)
    monkeypatch.setattr(_jit, "_is_x86_64", lambda: False)
    assert _jit._levels() == ([("compiler default", [])], [], "")


def test_each_load_maps_the_file_it_checked(tmp_path, monkeypatch):
    # Libraries are loaded through /proc/self/fd/<n>, and the dynamic loader returns the
    # library it loaded earlier under the same name: a second load (another cache, the same
    # fd number) must still map its own file. In this process: an -O0 baseline build is
    # harmless beside the real one.
    monkeypatch.setenv("CC", f"{shlex.quote(_cc())} -O0")
    monkeypatch.delenv("BATCHNORM_CC_TIMEOUT", raising=False)
    if platform.machine() == "x86_64":
        monkeypatch.setenv("BATCHNORM_MARCH", "x86-64")
    loaded = []
    for cache in ("a", "b"):
        monkeypatch.setenv("BATCHNORM_CACHE", str(tmp_path / cache))
        lib, info = _jit._load()
        assert Path(info["path"]).parent == _user_dir(tmp_path / cache)
        loaded.append((lib, info))
    (a, info_a), (b, info_b) = loaded
    assert a._handle != b._handle and info_a["path"] != info_b["path"]
    with open("/proc/self/maps") as f:
        maps = f.read()
    assert info_a["path"] in maps and info_b["path"] in maps


def test_every_entry_point_is_spelled_out_in_the_source():
    # grep bn_<kind>_f32 finds each exported kernel's definition: no name is token-pasted
    source = Path(_jit._SOURCE).read_text()
    for kind in _jit.ENTRY_POINTS:
        for suf in ("f32", "f64"):
            assert re.search(rf"^\w[\w ]* bn_{kind}_{suf}\(const struct bn_{kind}_args \*a\) \{{", source, re.M), \
                (kind, suf)
    assert "##SUF(" not in "".join(line for line in source.splitlines() if line.startswith(("int bn_", "void bn_")))


def test_mismatched_argument_struct_is_refused(monkeypatch):
    # A ctypes mirror that disagrees with the C struct (here one whose int64 field became an
    # int32 that the padding hides: same size, same offsets) is found before any call, and
    # the kernels are not used.
    import ctypes
    _cc()
    if _jit.kernels() is None:
        pytest.skip(_jit.status())
    fields = [(n, ctypes.c_int32 if n == "m" else t) for n, t in _jit.CheckStatsArgs._fields_]
    short = type("CheckStatsArgs", (ctypes.Structure,), {"_fields_": fields})
    assert ctypes.sizeof(short) == ctypes.sizeof(_jit.CheckStatsArgs)
    monkeypatch.setitem(_jit.ENTRY_POINTS, "check_stats", (short, ctypes.c_int))
    lib = ctypes.CDLL(str(_jit._info["path"]))  # its own function objects: the loaded ones stay declared
    with pytest.raises(_jit._Fallback, match="bn_check_stats .* does not match its mirror CheckStatsArgs"):
        _jit._declare(lib)
