"""Rebuild the results CSV from the run folders, or merge into it the rows it lacks.

    python -m lowrank_bench.collect outputs/ [more folders] [--csv results/runs.csv] [--merge | --rebuild]

Every run leaves its row in its folder's summary.json (the row, plus tables beside it: `results.row_of` takes them
off), so the folders are the record and the CSV a copy. A multi-node sweep on a filesystem whose file locks do
nothing (NFS without lockd, some Lustre mounts) can lose or double rows of the shared CSV; this command, run once
after the sweep, ends with every finished or diverged run exactly once. A row's identity is its `run_dir` (a run
resumed after its row was written keeps its folder: still one row); a row without one is known by timestamp,
method, model, task, seed and config_hash.

`--merge` (the default) keeps every row of the CSV, drops repeated ones (the first stays) and appends the runs it
lacks, oldest first. `--rebuild` writes the rows of the folders only, oldest first; rows of the old file that no
folder given accounts for (runs elsewhere, folders deleted) are kept in `<csv>.bak`. Either way the file is written
whole to a temp file and renamed, under the CSV's lock, with the columns `append_row` would give it.

Folders whose run is running, interrupted or failed are skipped and counted, as are damaged summary.json files
(one warning line each). A CSV that cannot be written, or is not lrbench's, is one line and exit status 2.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from filelock import Timeout

from lowrank_bench import results
from lowrank_bench.errors import LrbenchError, report

PROG = "python -m lowrank_bench.collect"
COUNTED = ("finished", "diverged")  # the statuses that write a row (train.run)
REQUIRED = ("method", "model", "task", "seed")
PRUNED = {"checkpoints", ".hydra", "wandb"}  # never a run folder, and checkpoints can be many


@dataclass
class Found:
    rows: list[dict] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)  # reason -> folders
    folders: int = 0


def identity(row: dict) -> tuple:
    run_dir = str(row.get("run_dir") or "")
    if run_dir:
        return ("run_dir", run_dir)
    return ("row", *(str(row.get(k, "")) for k in ("timestamp", *REQUIRED, "config_hash")))


def run_folders(roots: list[Path]):
    """Every folder under `roots` that holds a summary.json, in a stable order."""
    for root in roots:
        for folder, subfolders, files in os.walk(root):
            subfolders[:] = sorted(d for d in subfolders if d not in PRUNED)
            if "summary.json" in files:
                yield Path(folder)


def read_run(folder: Path) -> tuple[dict | None, str]:
    """(the row the run appended, "") or (None, why it is skipped)."""
    try:
        summary = json.loads((folder / "summary.json").read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        return None, f"damaged summary.json ({type(err).__name__}: {err})"
    if not isinstance(summary, dict) or not all(k in summary for k in REQUIRED):
        return None, f"damaged summary.json (not a run's row: it lacks {', '.join(REQUIRED)})"
    status_file = folder / "status"
    try:
        status = status_file.read_text().strip() if status_file.is_file() else ""
    except (OSError, UnicodeDecodeError) as err:
        return None, f"unreadable status file ({type(err).__name__}: {err})"
    # No status file: an evaluation's folder (mode=eval writes its row and summary.json only), or an older run.
    status = status or summary.get("status") or ("finished" if summary.get("mode") == "eval" else "unknown")
    if status not in COUNTED:
        return None, f"status {status}"
    return results.row_of(summary), ""


def find(roots: list[Path], warn) -> Found:
    found, seen = Found(), set()
    for folder in run_folders(roots):
        found.folders += 1
        row, why = read_run(folder)
        if row is None:
            if why.startswith(("damaged", "unreadable")):
                warn(f"{folder / 'summary.json'}: {why}; skipped")
                why = why.split(" (")[0]
            found.skipped[why] += 1
            continue
        key = identity(row)
        if key in seen:  # a copied run folder: the same run twice
            found.skipped["same run_dir as another folder"] += 1
            continue
        seen.add(key)
        found.rows.append(row)
    found.rows.sort(key=lambda r: (str(r.get("timestamp", "")), str(r.get("run_dir", ""))))
    return found


def check_writable(path: Path) -> None:
    if path.is_dir():
        raise LrbenchError(f"--csv {path} is a folder; give a file path")
    existing = next(p for p in (path.parent, *path.parent.parents) if p.exists())
    if not existing.is_dir():
        raise LrbenchError(f"--csv {path} cannot be written: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise LrbenchError(f"--csv {path} cannot be written: no write permission on {existing}")
    if path.is_file() and not os.access(path, os.R_OK):
        raise LrbenchError(f"--csv {path} cannot be read: no read permission")


def header_of(path: Path) -> list[str]:
    if not (path.is_file() and path.stat().st_size):
        return []
    with open(path, newline="", errors="replace") as handle:
        header = next(csv.reader(handle), [])
    if not set(REQUIRED) <= set(header):
        raise LrbenchError(f"--csv {path} is not an lrbench results file (its header lacks {', '.join(REQUIRED)}); "
                           "give another path")
    return header


def columns_of(header: list[str], rows: list[dict]) -> list[str]:
    """The header, then each new column where a row first brings it: what appending the rows one by one gives."""
    return list(dict.fromkeys([*header, *(k for row in rows for k in row)]))


def collect(roots: list[Path], csv_path: Path, rebuild: bool, warn=None) -> dict:
    """Merge (or rebuild) `csv_path` from the run folders under `roots`; returns the counts."""
    warn = warn or (lambda line: print(f"lrbench warning: {line}", file=sys.stderr, flush=True))
    missing = [str(r) for r in roots if not r.is_dir()]
    if missing:
        raise LrbenchError(f"{', '.join(missing)}: no such folder; give the folders the runs wrote to "
                           "(output_dir / LRBENCH_OUTPUT_DIR)")
    check_writable(csv_path)
    found = find(roots, warn)
    if rebuild and not found.rows:
        raise LrbenchError(f"no finished or diverged run under {', '.join(map(str, roots))}: {csv_path} is left as "
                           "it is (--rebuild would empty it)")
    counts = {"folders": found.folders, "rows": len(found.rows), "skipped": dict(found.skipped)}
    try:
        csv_path.parent.mkdir(parents=True, exist_ok=True)
        with results.csv_lock(csv_path):
            header = header_of(csv_path)
            if header:
                results.heal(csv_path)
            old = results.whole_rows(csv_path, header)
            if rebuild:
                kept = {identity(r) for r in found.rows}
                dropped = [r for r in old if identity(r) not in kept]
                if dropped:
                    shutil.copyfile(csv_path, csv_path.with_name(csv_path.name + ".bak"))
                present = {identity(r) for r in old}
                counts.update(added=sum(identity(r) not in present for r in found.rows),
                              already=sum(identity(r) in present for r in found.rows), duplicates=0,
                              dropped=len(dropped))
                results.replace_rows(csv_path, columns_of([], found.rows), found.rows)
            else:
                unique, present = [], set()
                for row in old:
                    if identity(row) not in present:
                        present.add(identity(row))
                        unique.append(row)
                new = [r for r in found.rows if identity(r) not in present]
                counts.update(added=len(new), already=len(found.rows) - len(new),
                              duplicates=len(old) - len(unique), dropped=0)
                if new or len(unique) != len(old):  # else the file is already right: left untouched
                    results.replace_rows(csv_path, columns_of(header, new), unique + new)
    except Timeout:
        raise LrbenchError(f"{csv_path}.lock: held by another writer for 300 s (a run still appending?); try again "
                           "when the sweep has ended") from None
    except OSError as err:
        raise LrbenchError(f"--csv {csv_path} cannot be written ({err.strerror or err}); give a writable path") \
            from None
    return counts


def describe(counts: dict, csv_path: Path, rebuild: bool) -> str:
    skipped = counts["skipped"]
    lines = [f"{counts['folders']} run folder(s) with summary.json, {counts['rows']} row(s) to record",
             f"{csv_path}: {counts['added']} added, {counts['already']} already there"
             + (f", {counts['duplicates']} repeated row(s) removed" if counts["duplicates"] else "")
             + (f", {counts['dropped']} row(s) no folder accounts for dropped (kept in {csv_path.name}.bak)"
                if counts["dropped"] else "")
             + (" (rebuilt)" if rebuild else "")]
    if skipped:
        lines.append(f"skipped {sum(skipped.values())}: "
                     + ", ".join(f"{n} {why}" for why, n in sorted(skipped.items())))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", type=Path, help="folders holding run folders (outputs/, multirun/ ...)")
    parser.add_argument("--csv", type=Path, default=Path(os.environ.get("LRBENCH_RESULTS_CSV", "results/runs.csv")),
                        help="the results CSV (default: $LRBENCH_RESULTS_CSV or results/runs.csv)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--merge", action="store_true", help="keep the CSV's rows, add the missing ones (default)")
    mode.add_argument("--rebuild", action="store_true", help="write the folders' rows only")
    args = parser.parse_args(argv)
    try:
        counts = collect(args.folders, args.csv, args.rebuild)
    except LrbenchError as err:
        return report(err)
    print(describe(counts, args.csv, args.rebuild))
    return 0


if __name__ == "__main__":
    sys.exit(main())
