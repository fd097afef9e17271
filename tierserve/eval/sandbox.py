"""Run untrusted programs (HumanEval completions) and untrusted data (SVG rendering) in a child process.

Walls, outermost first:

1. Operating system, where it allows (probed once, see ``isolation()``):
   ``namespaces``: ``unshare -rmn`` -- a new user, mount and network namespace with no network interface but
   loopback, every mount remounted read-only except the fresh temporary working directory;
   ``network``: ``unshare -rn`` only; ``none``: neither is allowed (then only the Python guard blocks sockets).
   ``TIERSERVE_SANDBOX=namespaces|network|none`` forces a weaker level.
2. Resource limits (``setrlimit``): address space, CPU seconds, file size, no core dumps; a wall-clock time
   limit after which the whole process group is killed.
3. Environment: a new session, a scrubbed environment, ``python -I -S`` (no site-packages, no user paths),
   the working directory a new temporary directory that is deleted afterwards.
4. Python guard (``_sandbox_child.py``): no process creation, sockets, ctypes, or file access outside the
   working directory.
"""
from __future__ import annotations

import functools
import json
import os
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

CHILD = Path(__file__).with_name("_sandbox_child.py")
LEVELS = ("namespaces", "network", "none")

# Bind the working directory onto itself (so it stays writable), then remount every other mount read-only.
# /proc/self/mountinfo escapes blanks as \040: printf %b decodes them.
_NS_SCRIPT = r"""
W="$1"; shift
mount --bind "$W" "$W" || exit 97
while read -r _ _ _ _ mp _; do
  mp=$(printf '%b' "$mp")
  [ "$mp" = "$W" ] && continue
  mount -o remount,bind,ro "$mp" 2>/dev/null
done < /proc/self/mountinfo
cd "$W" || exit 97
exec "$@"
"""


@dataclass
class RunResult:
    returncode: int | None
    stdout: bytes
    stderr: bytes
    timed_out: bool
    seconds: float


def _prefix(level: str, workdir: str) -> list[str]:
    if level == "namespaces":
        return ["unshare", "-rmn", "sh", "-c", _NS_SCRIPT, "sh", workdir]
    if level == "network":
        return ["unshare", "-rn"]
    return []


def _limits(memory_mb: int, cpu_s: float, file_mb: int) -> tuple[list[str], object]:
    """Resource limits as a ``prlimit`` prefix (util-linux), else as a preexec_fn (not thread-safe)."""
    mem, cpu, fsz = memory_mb << 20, int(cpu_s) + 1, file_mb << 20
    if shutil.which("prlimit"):
        return ["prlimit", f"--as={mem}", f"--cpu={cpu}:{cpu + 1}", f"--fsize={fsz}", "--core=0", "--"], None

    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsz, fsz))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    return [], apply


@functools.cache
def _probe(level: str) -> bool:
    if not shutil.which("unshare"):
        return False
    with tempfile.TemporaryDirectory(prefix="tierserve-probe-") as w:
        outside = Path(tempfile.gettempdir()) / f"tierserve-probe-{secrets.token_hex(8)}"
        # works only if the namespace is set up and a write outside the workdir fails
        check = f"touch ok && ! touch {outside} 2>/dev/null" if level == "namespaces" else "true"
        try:
            r = subprocess.run(_prefix(level, w) + ["sh", "-c", check], capture_output=True, timeout=20, cwd=w,
                               check=False)
        except (OSError, subprocess.TimeoutExpired):
            return False
        leaked = outside.exists()
        if leaked:
            outside.unlink()
        return r.returncode == 0 and not leaked and (level != "namespaces" or (Path(w) / "ok").exists())


def isolation() -> str:
    """The strongest level this machine allows (or the weaker one ``TIERSERVE_SANDBOX`` asks for)."""
    want = os.environ.get("TIERSERVE_SANDBOX", "namespaces").strip().lower()
    if want not in LEVELS:
        raise ValueError(f"TIERSERVE_SANDBOX must be one of {', '.join(LEVELS)}, got {want!r}")
    for level in LEVELS[LEVELS.index(want):]:
        if level == "none" or _probe(level):
            return level
    return "none"


def run_isolated(argv: list[str], stdin: bytes = b"", timeout: float = 10.0, memory_mb: int = 1024,
                 file_mb: int = 16, workdir: str | None = None, level: str | None = None) -> RunResult:
    """Run ``argv`` in a fresh temporary working directory (deleted afterwards) behind every wall."""
    level = level or isolation()
    own = workdir is None
    wd = workdir or tempfile.mkdtemp(prefix="tierserve-sandbox-")
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": wd, "TMPDIR": wd, "LANG": "C.UTF-8"}
    t0 = time.perf_counter()
    try:
        limit_argv, preexec = _limits(memory_mb, timeout, file_mb)
        proc = subprocess.Popen(limit_argv + _prefix(level, wd) + argv, cwd=wd, env=env, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                                preexec_fn=preexec, close_fds=True)
        try:
            out, err = proc.communicate(stdin, timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            _kill(proc)
            out, err = proc.communicate()
            timed_out = True
        return RunResult(proc.returncode, out, err, timed_out, time.perf_counter() - t0)
    finally:
        if own:
            shutil.rmtree(wd, ignore_errors=True)


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()


@dataclass
class ExecResult:
    passed: bool
    status: str          # "passed" | "failed" | "timeout" | "crashed"
    detail: str          # short reason, never the program's output
    seconds: float


def run_program(code: str, timeout: float = 10.0, memory_mb: int = 1024, site_packages: bool = False
                ) -> ExecResult:
    """Execute a Python program; passed iff it runs to the end without an exception."""
    nonce = secrets.token_hex(16)
    flags = ["-I"] if site_packages else ["-I", "-S"]
    stdin = (json.dumps({"nonce": nonce}) + "\n" + code).encode("utf-8", errors="replace")
    r = run_isolated([sys.executable, *flags, str(CHILD)], stdin, timeout, memory_mb)
    report = ""
    for line in r.stdout.decode("utf-8", errors="replace").splitlines():
        if line.startswith(nonce + " "):
            report = line[len(nonce) + 1:]
    if r.timed_out:
        return ExecResult(False, "timeout", f"timed out after {timeout:g} s", r.seconds)
    if report == "PASS" and r.returncode == 0:
        return ExecResult(True, "passed", "", r.seconds)
    if report.startswith("FAIL "):
        return ExecResult(False, "failed", report[5:][:300], r.seconds)
    if report.startswith("ERROR "):
        raise RuntimeError(f"sandbox child could not start: {report[6:]}")
    why = f"exit status {r.returncode}"
    if r.returncode is not None and r.returncode < 0:
        why = f"killed by signal {signal.Signals(-r.returncode).name}"
    return ExecResult(False, "crashed", why, r.seconds)
