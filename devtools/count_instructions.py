"""Instructions per notification of the call-records step and logic, counted under valgrind.

On a shared host the same code's timings swing by half within minutes (see the README's
*Call-records benchmark*), so two codes cannot be told apart by two timed runs. Instructions are
counted exactly: two counts of the same code differ by a few thousand in a billion. They do not
see cache misses, and valgrind's CPU has no SHA extensions (the call ids' SHA-256 runs in
software under it, a fixed share of both counts).

Usage (needs valgrind and a compiled tree, ``make compile``: the counts are taken inside the
compiled functions' C symbols)::

    python -m devtools.count_instructions [--notifications 30000] [--against OTHER_TREE]

``--against`` counts a second compiled tree (for example a ``git worktree`` of an older commit,
compiled there) on the same notifications, and prints each figure's ratio to it. Results go to
``bench-results/`` as JSON.
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import shutil
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parents[1]

COLLECTED = {
    "step": ["CPyDef_step___Step___record", "CPyDef_step___Step___timers", "CPyDef_state___Store___commit"],
    "logic": ["CPyDef_call_records___CallRecords___decode", "CPyDef_call_records___CallRecords___on_event",
              "CPyDef_state___Store___commit", "CPyDef_state___Store___advance"],
}
"""What each measure counts: the compiled functions whose instructions (with all they call) are
collected. ``logic`` runs :func:`devtools.bench_results.logic_alone`, which decodes every record a
second time to time decoding apart: decoding is counted twice there, in every tree alike."""

SAMPLE_START_MS = 1_795_000_000_000
"""A fixed start for the simulated notifications, so that every count reads the same input."""


def _child(measure: str, sample: Path, notifications: int) -> None:
    """The counted process: ``measure`` over the first ``notifications`` of the sample."""
    texts = orjson.loads(sample.read_bytes())[:notifications]
    items = [(key.encode(), value.encode()) for key, value in texts]
    from processors.call_records import CallRecords, CallRecordsConfig
    if measure == "logic":
        from devtools.bench_results import logic_alone
        gc.collect()
        gc.freeze()
        outputs = logic_alone(items, CallRecords(CallRecordsConfig()))["outputs"]
    else:
        from processors.state import Store
        from processors.step import Record, Step
        records = [Record("bench", 0, i, key, value) for i, (key, value) in enumerate(items)]
        gc.collect()
        gc.freeze()
        store = Store()
        step = Step(CallRecords(CallRecordsConfig()), store, "bench", mode="replay")
        outputs = 0
        for i, rec in enumerate(records):
            outputs += len(step.record(rec, 0))
            if i % 500 == 499:
                outputs += len(step.timers(0, 0))
                store.commit()
        store.commit()
    print(f"outputs {outputs}", flush=True)


def count(tree: Path, measure: str, sample: Path, notifications: int) -> dict[str, int]:
    """Instructions callgrind collected in ``tree``'s compiled code for ``measure``. The counted
    process runs this file with ``tree`` first on its path, so an older tree without this tool
    can be counted too."""
    with tempfile.TemporaryDirectory() as tmp:
        command = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={tmp}/callgrind.out",
                   *(f"--toggle-collect={symbol}" for symbol in COLLECTED[measure]),
                   sys.executable, __file__, "--child", measure,
                   "--sample", str(sample), "--notifications", str(notifications)]
        env = {**os.environ, "PYTHONHASHSEED": "0", "PYTHONPATH": str(tree)}
        done = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True, check=False)
    found = re.search(r"Collected : (\d+)", done.stderr)
    outputs = re.search(r"^outputs (\d+)", done.stdout, re.M)
    if done.returncode != 0 or found is None or outputs is None:
        tail = (done.stderr.strip().splitlines() or ["(nothing)"])[-1]
        raise SystemExit(f"error: the counted run in {tree} failed: {tail}")
    if int(found.group(1)) == 0:
        raise SystemExit(f"error: nothing counted in {tree}: its modules are not compiled "
                         "(run `make compile` there)")
    return {"instructions": int(found.group(1)), "outputs": int(outputs.group(1))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m devtools.count_instructions",
        description="Instructions per notification of the compiled call-records step (with its timers) and "
                    "logic, counted under valgrind's callgrind; optionally against another compiled tree.")
    parser.add_argument("--notifications", type=int, default=30_000,
                        help="notifications of the simulated sample to run (default 30000; about a minute "
                             "per count)")
    parser.add_argument("--against", type=Path, metavar="TREE",
                        help="another compiled tree to count on the same notifications (printed as a ratio)")
    parser.add_argument("--out", default="bench-results", help="folder of the JSON results")
    parser.add_argument("--child", choices=sorted(COLLECTED), help=argparse.SUPPRESS)
    parser.add_argument("--sample", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args.child, args.sample, args.notifications)
        return 0
    if shutil.which("valgrind") is None:
        print("error: valgrind is not installed (apt-get install valgrind)", file=sys.stderr)
        return 2
    trees = {"this tree": ROOT}
    if args.against is not None:
        if not (args.against / "processors").is_dir():
            print(f"error: {args.against} is not a keyyo-stream tree", file=sys.stderr)
            return 2
        trees["against"] = args.against.resolve()
    from devtools.bench_call_records import simulated
    from devtools.bench_results import write_results
    print("simulating the notifications ...", flush=True)
    items = [(n.tenant.encode(), n.to_json()) for n in simulated(60_000, 2, SAMPLE_START_MS)]
    n = min(args.notifications, len(items))
    results: dict[str, Any] = {"time": datetime.now(tz=UTC).isoformat(timespec="seconds"), "notifications": n,
                               "trees": {name: str(path) for name, path in trees.items()}}
    with tempfile.TemporaryDirectory() as tmp:
        sample = Path(tmp) / "sample.json"  # keys and values are UTF-8 JSON texts
        sample.write_bytes(orjson.dumps([[key.decode(), value.decode()] for key, value in items]))
        for measure in COLLECTED:
            for name, tree in trees.items():
                print(f"counting {measure} in {name} ({tree}) ...", flush=True)
                got = count(tree, measure, sample, n)
                per = round(got["instructions"] / n)
                results.setdefault(measure, {})[name] = {**got, "per_notification": per}
    for measure in COLLECTED:
        figures = results[measure]
        line = (f"{measure}: {figures['this tree']['instructions']:,} instructions "
                f"({figures['this tree']['per_notification']:,} per notification)")
        if "against" in figures:
            ratio = figures["this tree"]["instructions"] / figures["against"]["instructions"]
            figures["ratio"] = round(ratio, 4)
            line += (f" against {figures['against']['instructions']:,}: {ratio:.3f}x"
                     + ("" if figures["this tree"]["outputs"] == figures["against"]["outputs"]
                        else " (the trees wrote different numbers of outputs)"))
        print(line)
    write_results(args.out, "instructions", results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
