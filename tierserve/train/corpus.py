"""The tierserve-nano corpus: the ``.py`` files of the running interpreter's standard library.

Stdlib-only on purpose: the eval suite imports this (``--corpus nano-heldout``) without torch or
transformers. The split is by file: a sha256 of ``"{seed}:{relative path}"`` puts about
``HELDOUT_FRAC`` of the files in the held-out split. ``seed`` here is the *split* seed; the training
script always uses ``SPLIT_SEED`` (0) whatever its ``--seed`` is, so held-out numbers stay comparable
across training seeds.
"""

from __future__ import annotations

import hashlib
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

SPLIT_SEED = 0
HELDOUT_FRAC = 0.02
MAX_FILE_BYTES = 200 * 1024
_EXCLUDED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"}


@dataclass(frozen=True)
class Corpus:
    """Sorted absolute paths of the two splits, the stdlib root, and a fingerprint dict."""

    root: Path
    train_files: list[Path]
    heldout_files: list[Path]
    fingerprint: dict = field(default_factory=dict)

    def rel(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"]).resolve()


def _included(rel_parts: tuple[str, ...]) -> bool:
    dirs = rel_parts[:-1]
    if any(d in _EXCLUDED_DIRS for d in dirs):
        return False
    # lib2to3's own tests are under lib2to3/tests (caught above); keep the explicit rule anyway.
    return not (len(dirs) >= 2 and dirs[0] == "lib2to3" and dirs[1].startswith("test"))


def list_stdlib_files(root: Path | None = None) -> list[Path]:
    """All eligible ``.py`` files under the stdlib root, sorted by relative POSIX path."""
    root = root or stdlib_root()
    out = []
    for p in root.rglob("*.py"):
        rel = p.relative_to(root)
        if not p.is_file() or not _included(rel.parts):
            continue
        if p.stat().st_size > MAX_FILE_BYTES:
            continue
        out.append(p)
    out.sort(key=lambda q: q.relative_to(root).as_posix())
    return out


def is_heldout(rel: str, seed: int = SPLIT_SEED, frac: float = HELDOUT_FRAC) -> bool:
    h = hashlib.sha256(f"{seed}:{rel}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2.0**64 < frac


def _fingerprint(root: Path, train: list[Path], heldout: list[Path], seed: int, frac: float,
                 max_files: int | None) -> dict:
    h = hashlib.sha256()
    sizes = {}
    for split, files in (("train", train), ("heldout", heldout)):
        h.update(f"[{split}]\n".encode())
        total = 0
        for p in files:
            data = p.read_bytes()
            total += len(data)
            rel = p.relative_to(root).as_posix().encode()
            h.update(len(rel).to_bytes(8, "little") + rel + len(data).to_bytes(8, "little") + data)
        sizes[split] = total
    py = ".".join(map(str, sys.version_info[:3]))
    fp = {
        "python_version": py,
        "split_seed": seed,
        "heldout_frac": frac,
        "max_files": max_files,
        "train_files": len(train),
        "heldout_files": len(heldout),
        "train_bytes": sizes["train"],
        "heldout_bytes": sizes["heldout"],
    }
    h.update(repr(sorted(fp.items())).encode())
    fp["sha256"] = h.hexdigest()
    return fp


def collect_corpus(seed: int = SPLIT_SEED, max_files: int | None = None, root: Path | None = None,
                   frac: float = HELDOUT_FRAC) -> Corpus:
    """Split the stdlib ``.py`` files into train / held-out.

    ``max_files`` (tests, quick runs) keeps ``max_files`` training files spread evenly over the
    sorted list and ``max(2, max_files // 20)`` held-out files; it is recorded in the fingerprint.
    """
    root = Path(root).resolve() if root else stdlib_root()
    files = list_stdlib_files(root)
    train, heldout = [], []
    for p in files:
        (heldout if is_heldout(p.relative_to(root).as_posix(), seed, frac) else train).append(p)
    if max_files is not None:
        n = max(1, min(max_files, len(train)))
        train = [train[i * len(train) // n] for i in range(n)]
        k = min(len(heldout), max(2, max_files // 20))
        heldout = [heldout[i * len(heldout) // k] for i in range(k)] if k else []
    return Corpus(root, train, heldout, _fingerprint(root, train, heldout, seed, frac, max_files))


def read_text(path: Path) -> str:
    return path.read_bytes().decode("utf-8", errors="replace")


def heldout_documents(seed: int = SPLIT_SEED, max_files: int | None = None) -> list[str]:
    """The held-out files' texts, one string per file, in sorted path order."""
    return [read_text(p) for p in collect_corpus(seed, max_files).heldout_files]


def heldout_text(seed: int = SPLIT_SEED, sep: str = "\n\n", max_files: int | None = None) -> str:
    """All held-out files concatenated with ``sep`` (the training script separates documents by
    ``<|endoftext|>`` instead; use :func:`heldout_documents` to do the same)."""
    return sep.join(heldout_documents(seed, max_files))


if __name__ == "__main__":  # python -m tierserve.train.corpus: print the fingerprint
    import json

    c = collect_corpus()
    print(json.dumps(c.fingerprint, indent=2))
    print("heldout:", ", ".join(c.rel(p) for p in c.heldout_files))
