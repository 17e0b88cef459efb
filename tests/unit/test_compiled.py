"""The optional compiled build (`make compile`, deploy/compiled.py): it computes exactly what pure
Python computes, and a build older than its sources is refused, never run."""

from __future__ import annotations

import importlib.machinery
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from deploy import compiled
from devtools.bench_call_records import simulated
from schemas.notification import parse_rfc3339_ms

# Run in a tree (pure or compiled): simulated traffic with hostile records mixed in, through the
# runtime's step into call records, and those records into acd-stats; prints what came out.
FOLD = """
import hashlib, json, sys
import orjson
from processors.acd_stats import AcdStatsLogic
from processors.call_records import CallRecords
from processors.driver import Driver
from schemas.notification import parse_rfc3339_ms
from schemas.topics import CALL_RECORDS
import processors.call_records, processors.acd_stats, processors.step, schemas.notification

def digest(outputs):
    h = hashlib.sha256()
    for o in outputs:
        h.update(o.topic.encode() + b"|" + (o.key or b"") + b"|" + o.rendered() + b"\\n")
    return h.hexdigest()

calls = Driver(CallRecords())
with open(sys.argv[1], "rb") as f:
    for i, line in enumerate(f):
        key, value, ts = orjson.loads(line)
        calls.send(key.encode(), value.encode(), ts)
        if i % 97 == 0:  # hostile or clumsy records among them: each must be set aside the same way
            calls.send(b"acme", b'{"schema": "keyyo.notification.v1", "type": "SETUP"', ts)
            calls.send(b"other", value.encode(), ts)
calls.flush(24 * 3600_000)
acd = Driver(AcdStatsLogic())
for o in calls.outputs:
    if o.topic == CALL_RECORDS.name:
        acd.send(o.key, o.rendered())
acd.flush(24 * 3600_000)
mods = [processors.call_records, processors.acd_stats, processors.step, schemas.notification]
print(json.dumps({"compiled": sum(not m.__file__.endswith(".py") for m in mods),
                  "native": processors.call_records._native is not None,
                  "call_records": [len(calls.outputs), digest(calls.outputs)],
                  "acd_stats": [len(acd.outputs), digest(acd.outputs)],
                  "state": hashlib.sha256(orjson.dumps(sorted(
                      (k, calls.store.get(k).decode()) for k in calls.store.processor_keys()))).hexdigest()}))
"""


def _fold(tree: Path, traffic: Path) -> dict[str, object]:
    # One hash seed for every run: timers due at the same time fire tenant by tenant, in the order
    # of a set of tenants, and that order (not part of the contract) follows the seed.
    done = subprocess.run([sys.executable, "-c", FOLD, str(traffic)], cwd=tree,
                          env={"PYTHONPATH": str(tree), "PYTHONHASHSEED": "0"},
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, object] = json.loads(done.stdout)
    return result


@pytest.mark.skipif(compiled.missing_tools() is not None, reason=str(compiled.missing_tools()))
def test_the_compiled_build_computes_what_pure_python_computes(tmp_path: Path) -> None:
    tree = compiled.copy_tree(tmp_path / "tree")
    traffic = tmp_path / "traffic.jsonl"
    with traffic.open("wb") as f:
        for n in simulated(4000, 7, 1_795_000_000_000):
            f.write(orjson.dumps([n.tenant, n.to_json().decode(), parse_rfc3339_ms(n.event_time)]) + b"\n")
    pure = _fold(tree, traffic)
    assert pure["compiled"] == 0 and pure["native"] is False
    compiled.build(tree)
    with_native = compiled.native_missing() is None  # the Rust fold too, when cargo is there
    assert [s.state for s in compiled.status(tree)] == [
        "compiled"] * len(compiled.MODULES) + ["compiled" if with_native else "pure"]
    native = _fold(tree, traffic)
    assert native["compiled"] == 4  # the modules really were the extensions
    assert native == {**pure, "compiled": 4, "native": with_native}
    calls_out = pure["call_records"]
    assert isinstance(calls_out, list) and calls_out[0] > 1000  # the run did fold calls
    acd_out = pure["acd_stats"]
    assert isinstance(acd_out, list) and acd_out[0] > 0

    # The logic's own unit tests in the compiled copy: every call flow, the store, and the hostile
    # records (whose logic wraps CallRecords and reads what its decode returns, as a user's may).
    shutil.copytree(compiled.ROOT / "tests", tree / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "tests/unit/test_call_records.py", "tests/unit/test_store.py",
                           "tests/unit/test_hostile_records.py"],
                          cwd=tree, env={"PYTHONPATH": str(tree)}, capture_output=True, text=True,
                          timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-3000:]

    # A source edited after the build: every command refuses to start, in one line.
    with (tree / "processors" / "call_records.py").open("a") as f:
        f.write("\n# edited\n")
    done = subprocess.run([sys.executable, "-m", "deploy.cli", "status"], cwd=tmp_path,
                          env={"PYTHONPATH": str(tree)}, capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "keyyo-stream: processors/call_records.py changed after `make compile`: the compiled copy "
        "would run the old code; run `make compile` again, or `make uncompile` for pure Python"]
    # The extensions, the group's shared library and the native fold.
    assert compiled.clean(tree) == len(compiled.MODULES) + 1 + with_native
    assert _fold(tree, traffic) == pure


def _fake_tree(root: Path) -> Path:
    for source in compiled.MODULES:
        (root / source).parent.mkdir(parents=True, exist_ok=True)
        (root / source).write_text(f"# {source}\n")
    return root


def test_status_tells_pure_compiled_and_stale_modules_apart(tmp_path: Path) -> None:
    root = _fake_tree(tmp_path)
    assert {s.state for s in compiled.status(root)} == {"pure"}
    assert compiled.check(root) == 0
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    first, second = compiled.MODULES[0], compiled.MODULES[1]
    for source in (first, second):
        (root / source.replace(".py", suffix)).write_bytes(b"\x7fELF")
    # Extensions without a manifest vouching for their sources: stale, never trusted.
    assert [s.state for s in compiled.status(root)][:3] == ["stale", "stale", "pure"]
    (root / compiled.MANIFEST).write_bytes(orjson.dumps({"sources": {
        source: compiled._digest(root / source) for source in compiled.MODULES}}))
    assert [s.state for s in compiled.status(root)][:3] == ["compiled", "compiled", "pure"]
    assert compiled.check(root) == 2
    (root / second).write_text("# edited\n")
    assert [s.state for s in compiled.status(root)][:2] == ["compiled", "stale"]
    with pytest.raises(compiled.CompiledError, match=f"^{second} changed after `make compile`"):
        compiled.check(root)
    # An extension for another Python version is not imported by this one: it does not count.
    (root / first.replace(".py", ".cpython-29-x86_64-linux-gnu.so")).write_bytes(b"\x7fELF")
    assert compiled.clean(root) == 2
    assert {s.state for s in compiled.status(root)} == {"pure"}
    assert not (root / compiled.MANIFEST).exists()
    assert (root / first.replace(".py", ".cpython-29-x86_64-linux-gnu.so")).exists()


def test_the_native_fold_is_stale_once_any_file_of_its_crate_changes(tmp_path: Path) -> None:
    root = _fake_tree(tmp_path)
    crate = root / compiled.NATIVE
    (crate / "src").mkdir(parents=True)
    for name, text in (("Cargo.toml", "[package]\n"), ("Cargo.lock", "# lock\n"), ("src/lib.rs", "// a\n")):
        (crate / name).write_text(text)
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    (root / (compiled.NATIVE_MODULE + suffix)).write_bytes(b"\x7fELF")
    assert compiled.status(root)[-1] == compiled.ModuleState(compiled.NATIVE, "stale")
    (root / compiled.MANIFEST).write_bytes(orjson.dumps({"sources": {
        compiled.NATIVE: compiled._digest(crate)}}))
    assert compiled.check(root) == 1
    for edit in ("Cargo.lock", "src/lib.rs", "src/more.rs"):
        (root / compiled.MANIFEST).write_bytes(orjson.dumps({"sources": {
            compiled.NATIVE: compiled._digest(crate)}}))
        assert compiled.status(root)[-1].state == "compiled"
        (crate / edit).write_text("// edited\n")
        with pytest.raises(compiled.CompiledError, match=f"^{compiled.NATIVE} changed after"):
            compiled.check(root)
    assert compiled.clean(root) == 1
    assert compiled.status(root)[-1].state == "pure"


def test_each_tree_gets_the_extension_of_its_own_crate(tmp_path: Path) -> None:
    """Cargo's build folder is shared by every tree, and cargo judges a crate fresh by its files'
    times. Tree A built, then tree B with other sources, then A again with files older than its
    last build (as a worktree or an extracted archive has them): A must get its own extension,
    not B's."""
    missing = compiled.native_missing()
    if missing is not None:
        pytest.skip(missing)
    trees = {}
    for name in ("a", "b"):
        crate = tmp_path / name / compiled.NATIVE
        shutil.copytree(compiled.ROOT / compiled.NATIVE, crate, ignore=shutil.ignore_patterns("target"))
        if name == "b":
            with (crate / "src" / "lib.rs").open("a") as f:
                f.write("\n// tree b\n")
        trees[name] = tmp_path / name

    def built_from(name: str) -> str:
        out = tmp_path / f"out-{name}"
        out.mkdir(exist_ok=True)
        path = compiled.build_native(trees[name], dest=out)
        done = subprocess.run(
            [sys.executable, "-c", "import importlib.util, sys; s = importlib.util.spec_from_file_location("
             "'_native', sys.argv[1]); m = importlib.util.module_from_spec(s); s.loader.exec_module(m); "
             "print(m.SOURCES)", str(path)], capture_output=True, text=True, check=True)
        return done.stdout.strip()

    digest_a = compiled._digest(trees["a"] / compiled.NATIVE)
    digest_b = compiled._digest(trees["b"] / compiled.NATIVE)
    assert digest_a != digest_b
    assert built_from("a") == digest_a
    assert built_from("b") == digest_b
    for part in (trees["a"] / compiled.NATIVE).rglob("*"):
        os.utime(part, (1_577_836_800, 1_577_836_800))  # 2020-01-01
    assert built_from("a") == digest_a
