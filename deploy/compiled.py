"""The optional compiled build: the per-record modules compiled by mypyc, in place (`make compile`),
and the native fold of call records (Rust, ``processors/native``) when cargo is installed.

mypyc (part of mypy, a dev dependency) turns these type-checked modules into C extensions, which
Python then imports instead of the ``.py`` files beside them; nothing else changes. The native
fold is a Rust extension (PyO3) that, when it is there, ``processors/call_records.py`` uses for
the common case of a notification and ``processors/acd_stats.py`` to decode call records and
write the figures of intervals. A manifest (``processors/_compiled.json``) keeps the hash of
each source it was built from: a source edited after the build makes the build **stale**, and
every ``keyyo-stream`` command (and the test suite) then refuses to start rather than run the old
code. ``make uncompile`` goes back to pure Python.

    python -m deploy.compiled build|clean|status [--root DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.machinery
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

MODULES = (
    "ingest/parsing.py",
    "schemas/notification.py",
    "schemas/call_record.py",
    "schemas/acd_stats.py",
    "processors/state.py",
    "processors/step.py",
    "processors/output.py",
    "processors/call_records.py",
    "processors/acd_stats.py",
)
"""What each record goes through: decoding and checking, the store, the runtime's step, the two
processors' logic. Their classes are not meant to be subclassed (an interpreted class cannot
inherit from a compiled one): a processor implements the contract's protocol instead."""

NATIVE = "processors/native"
"""The native fold's crate (its sources: ``Cargo.toml``, ``Cargo.lock``, ``src/``); built into
``processors/_native`` (:data:`NATIVE_MODULE`). Optional: without cargo, the build skips it."""
NATIVE_MODULE = "processors/_native"

SOURCES = (*MODULES, NATIVE)
"""Everything the build may compile, as the manifest and :func:`status` name it."""

GROUP = "processors._compiled"
"""mypyc's shared library of the group, inside a package so that the editable install finds it."""

MANIFEST = "processors/_compiled.json"
BUILD_DIR = "build/compiled"


class CompiledError(Exception):
    """A compiled build that cannot be used or made; its message is one line for the user."""


@dataclass(frozen=True)
class ModuleState:
    source: str
    state: str
    """``pure`` (no extension beside it), ``compiled`` (built from this source), ``stale``."""


def _extensions(root: Path, source: str) -> list[Path]:
    stem = root / (NATIVE_MODULE if source == NATIVE else source[: -len(".py")])
    return [p for suffix in importlib.machinery.EXTENSION_SUFFIXES
            if (p := stem.with_name(stem.name + suffix)).exists()]


def _native_sources(crate: Path) -> list[Path]:
    return [crate / "Cargo.toml", crate / "Cargo.lock", *sorted((crate / "src").rglob("*.rs"))]


def _digest(path: Path) -> str:
    """A source's SHA-256; for the crate, of its files' names and contents."""
    if not path.is_dir():
        return hashlib.sha256(path.read_bytes()).hexdigest()
    h = hashlib.sha256()
    for part in _native_sources(path):
        h.update(f"{part.relative_to(path)}\0".encode())
        h.update(part.read_bytes() if part.exists() else b"(absent)")
        h.update(b"\0")
    return h.hexdigest()


def status(root: Path = ROOT) -> list[ModuleState]:
    """The state of each module, for this interpreter (an extension built for another Python
    version is not imported by this one, so it counts as absent)."""
    try:
        manifest = json.loads((root / MANIFEST).read_bytes())
    except (OSError, ValueError):
        manifest = {}
    built = manifest.get("sources", {}) if isinstance(manifest, dict) else {}
    states = []
    for source in SOURCES:
        if not _extensions(root, source):
            states.append(ModuleState(source, "pure"))
        elif built.get(source) == _digest(root / source):
            states.append(ModuleState(source, "compiled"))
        else:
            states.append(ModuleState(source, "stale"))
    return states


def check(root: Path = ROOT) -> int:
    """How many modules run compiled; :class:`CompiledError` if any compiled one is stale."""
    states = status(root)
    stale = [s.source for s in states if s.state == "stale"]
    if stale:
        raise CompiledError(
            f"{', '.join(stale)} changed after `make compile`: the compiled copy would run the old "
            f"code; run `make compile` again, or `make uncompile` for pure Python")
    return sum(s.state == "compiled" for s in states)


def copy_tree(dest: Path, root: Path = ROOT) -> Path:
    """A copy of the tree's packages and ``pyproject.toml`` (mypy's settings) at ``dest``, without
    any compiled file: for building and comparing a compiled copy beside a pure one."""
    for name in ("schemas", "processors", "deploy", "devtools", "ingest"):
        shutil.copytree(root / name, dest / name, ignore=shutil.ignore_patterns(
            "__pycache__", "*.so", "*.pyd", "_compiled.json", "target"))
    shutil.copy(root / "pyproject.toml", dest / "pyproject.toml")
    return dest


def clean(root: Path = ROOT) -> int:
    """Remove the extensions, the group's shared library, the manifest and the build files."""
    removed = 0
    for source in SOURCES:
        for path in _extensions(root, source):
            path.unlink()
            removed += 1
    for path in (root / "processors").glob("_compiled__mypyc.*"):
        path.unlink()
        removed += 1
    (root / MANIFEST).unlink(missing_ok=True)
    shutil.rmtree(root / BUILD_DIR, ignore_errors=True)
    return removed


_SETUP = """
import sys
from setuptools import setup
from mypyc.build import mypycify
setup(name="keyyo-stream-compiled", script_args=["build_ext", "--inplace", "--build-temp",
      sys.argv[1] + "/temp", "--build-lib", sys.argv[1] + "/lib"],
      ext_modules=mypycify(sys.argv[2:], group_name={group!r}, target_dir=sys.argv[1] + "/c",
                           opt_level="3"))
"""


def missing_tools() -> str | None:
    """What the build needs and this machine lacks (one line), or None."""
    if shutil.which(os.environ.get("CC", "cc")) is None and shutil.which("gcc") is None:
        return "no C compiler found (cc or gcc): install one (Debian: apt-get install gcc)"
    try:
        import mypyc  # noqa: F401
    except ImportError:
        return ("mypyc is not installed: it comes with the dev tools "
                "(pip install -e '.[dev]', which `make setup` runs)")
    return None


def native_missing() -> str | None:
    """Why the native fold cannot be built here (one line), or None."""
    cargo = shutil.which("cargo")
    if cargo is None:
        return "cargo not found: the native fold is skipped (install Rust: https://rustup.rs)"
    try:  # a rustup proxy without a toolchain is there but does not run
        done = subprocess.run([cargo, "--version"], capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"cargo does not run ({exc}): the native fold is skipped"
    if done.returncode != 0:
        reason = (done.stderr.strip().splitlines() or ["no output"])[0]
        return f"cargo does not run ({reason}): the native fold is skipped"
    return None


def native_target() -> Path:
    """Cargo's build folder, shared by every tree of this user (its dependencies build once)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "keyyo-stream" / "native-target"


def build_native(root: Path = ROOT, python: str = sys.executable, dest: Path | None = None) -> Path:
    """Build the native fold of the tree at ``root`` with cargo, into ``processors/_native`` (or
    into the folder ``dest``); the extension's path."""
    crate = root / NATIVE
    # The crate's digest goes in as an environment variable the crate reads (`SOURCES`): cargo
    # rebuilds a crate whose environment changed. Its own check is by times, and the build folder
    # is shared: a tree whose sources were older than the last build of another tree got that
    # tree's extension (seen with two trees alternating; a worktree would do the same).
    sources = _digest(crate)
    done = subprocess.run(
        [shutil.which("cargo") or "cargo", "build", "--release", "--locked", "--quiet", "--manifest-path",
         str(crate / "Cargo.toml")],
        env={**os.environ, "CARGO_TARGET_DIR": str(native_target()), "PYO3_PYTHON": python,
             "KEYYO_NATIVE_SOURCES": sources},
        capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tail = (done.stdout + done.stderr).strip().splitlines()[-15:]
        raise CompiledError("cargo failed to build the native fold:\n" + "\n".join(tail))
    built = native_target() / "release" / "lib_native.so"
    if sources.encode() not in built.read_bytes():
        raise CompiledError(f"cargo's build in {native_target()} is not of {crate}'s sources; "
                            "remove that folder and build again")
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    target = root / (NATIVE_MODULE + suffix) if dest is None else dest / ("_native" + suffix)
    shutil.copy(built, target)
    return target


def build(root: Path = ROOT, python: str = sys.executable) -> float:
    """Compile :data:`MODULES` of the tree at ``root`` in place, and the native fold when cargo
    is there (:func:`native_missing`); seconds taken."""
    missing = missing_tools()
    if missing is not None:
        raise CompiledError(missing)
    clean(root)
    sources = SOURCES if native_missing() is None else MODULES
    digests = {source: _digest(root / source) for source in sources}
    started = time.monotonic()
    done = subprocess.run(
        [python, "-c", _SETUP.format(group=GROUP), BUILD_DIR, *MODULES],
        cwd=root, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        clean(root)
        tail = (done.stdout + done.stderr).strip().splitlines()[-15:]
        raise CompiledError("mypyc failed:\n" + "\n".join(tail))
    if NATIVE in digests:
        try:
            build_native(root, python)
        except CompiledError:
            clean(root)
            raise
    changed = [s for s in sources if _digest(root / s) != digests[s]]
    if changed:  # edited while it compiled: the manifest would vouch for code that was not built
        clean(root)
        raise CompiledError(f"{', '.join(changed)} changed during the build; run it again")
    (root / MANIFEST).write_text(json.dumps(
        {"sources": digests, "python": sys.version.split()[0], "built_at": int(time.time())}, indent=2))
    return time.monotonic() - started


def main(argv: list[str] | None = None) -> int:
    """``build``, ``clean`` or ``status`` (the default)."""
    parser = argparse.ArgumentParser(prog="python -m deploy.compiled", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", nargs="?", choices=["build", "clean", "status"], default="status")
    parser.add_argument("--root", type=Path, default=ROOT, help="the source tree (default: this one)")
    args = parser.parse_args(argv)
    try:
        if args.action == "build":
            skipped = native_missing()
            print(f"compiling {len(MODULES)} modules with mypyc"
                  f"{'' if skipped else ', then the native fold with cargo'} "
                  f"(about 30 s on 2 cores{'' if skipped else ', a minute more the first time'}) ...",
                  flush=True)
            seconds = build(args.root)
            print(f"compiled in {seconds:.0f} s: {', '.join(MODULES)}"
                  f"{'' if skipped else ', ' + NATIVE}")
            if skipped:
                print(skipped)
        elif args.action == "clean":
            print(f"removed {clean(args.root)} compiled files; the pure Python modules run again")
        else:
            for s in status(args.root):
                print(f"{s.state:9} {s.source}")
            check(args.root)
    except CompiledError as exc:
        print(f"keyyo-stream: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
