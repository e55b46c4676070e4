"""What a run leaves behind: the resolved config, metrics.jsonl, summary.json in its run directory, one row in
`results/runs.csv` (appended under a file lock, so concurrent sweep jobs never interleave or lose rows), and
optionally a wandb run. Nothing is written to the shared CSV unless the run finished.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import platform
import subprocess
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from filelock import FileLock
from omegaconf import OmegaConf
from rich.console import Console
from rich.table import Table

from lowrank_bench.console import out as stdout_console
from lowrank_bench.errors import LrbenchError
from lowrank_bench.extras import require

PROJECT_ROOT = Path(__file__).resolve().parents[1]
LEADING_COLUMNS = ["timestamp", "method", "model", "task", "seed", "rank", "trainable_params", "adapter_params",
                   "head_params", "total_params", "trainable_pct", "metric"]


# -- provenance -------------------------------------------------------------------------------------------------
def git_commit() -> str:
    """The commit of the code, `-dirty` when tracked files differ from it: asked of git when the package runs from its
    repository; else the commit written into the package when it was built (a wheel, `pip install .`); else
    $LRBENCH_GIT_COMMIT (the Docker image sets it from its GIT_COMMIT build argument: no .git in its build context);
    else "unknown"."""
    return checkout_commit() or built_commit() or os.environ.get("LRBENCH_GIT_COMMIT", "").strip() or "unknown"


def checkout_commit() -> str | None:
    """HEAD of the repository whose top is PROJECT_ROOT. An installed package's PROJECT_ROOT (site-packages) is no
    repository's top, even inside one (a .venv in some checkout): that repository's HEAD is not this code's."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=PROJECT_ROOT, capture_output=True, text=True, check=False,
                              timeout=5).stdout.strip()

    try:
        top = git("rev-parse", "--show-toplevel")
        if not top or Path(top).resolve() != PROJECT_ROOT:
            return None
        commit = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit}{'-dirty' if dirty else ''}" if commit else None


def built_commit() -> str | None:
    """The commit setuptools-scm wrote into lowrank_bench/_build_info.py at build time (absent from a checkout)."""
    try:
        from lowrank_bench import _build_info
    except ImportError:
        return None
    node = getattr(_build_info, "node", None)  # "g<commit id>", git's describe style
    if not node:
        return None
    return f"{node.removeprefix('g')}{'-dirty' if getattr(_build_info, 'dirty', False) else ''}"


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    from lowrank_bench import __version__

    out = {"lrbench": __version__, "python": platform.python_version()}
    for package in ("torch", "transformers", "peft", "datasets", "hydra-core"):
        try:
            out[package.replace("-core", "")] = version(package)
        except PackageNotFoundError:
            out[package] = "absent"
    return out


def device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


# -- the summary ------------------------------------------------------------------------------------------------
def provenance() -> dict[str, str]:
    """Package versions and the git commit of the code, read when the run starts."""
    return {**versions(), "git_commit": git_commit()}


def is_metric(key: str, value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("step", "epoch") \
        and not key.startswith("train_")


def defined(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def defined_or_none(value):
    """An undefined measure (NaN: a correlation with a constant side) is written as null / a blank cell."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def final_stage(evals: list[dict]) -> list[dict]:
    """The evaluations of the stage that made the reported model, the last one evaluated: all of them in a one-stage
    run; with BiDoRA's retraining, the retraining's only (the official code keeps the search's and the retraining's
    evaluations in separate lists, run_glue_bilevel.py:412, 503 and 553, 642), so that a search-phase score is never
    reported as the retrained model's. A run that diverged before its last stage evaluated: the stage it reached."""
    stage = evals[-1].get("stage")
    return [r for r in evals if r.get("stage") == stage]


def best_of(evals: list[dict], metric: str) -> dict:
    return max(evals, key=lambda r: r[metric] if defined(r.get(metric)) else -math.inf)  # an undefined one: never


def earlier_stages_best(evals: list[dict], metric: str) -> dict:
    """`<stage>_best_<metric>` of every stage before the last (BiDoRA's `search_best_accuracy`): reported beside,
    never as, the run's best."""
    last_stage = evals[-1].get("stage")
    stages = list(dict.fromkeys(r.get("stage") for r in evals if r.get("stage") not in (None, last_stage)))
    return {f"{str(stage).replace('/', '_')}_best_{metric}":
            defined_or_none(best_of([r for r in evals if r.get("stage") == stage], metric).get(metric))
            for stage in stages}


def best_and_last(evals: list[dict], metric: str) -> dict:
    """The best evaluation (by `metric`) of the last stage (`final_stage`) and the last one, every metric of each;
    `degenerate` when the last evaluation's classifier predicted a single class on any evaluation split; a metric
    that could not be computed keeps its reason (`last_meteor_error`) instead of a number."""
    if not evals:
        raise RuntimeError("the run finished without an evaluation")
    best = best_of(final_stage(evals), metric)
    last = evals[-1]
    names = [k for k, v in last.items() if is_metric(k, v)]
    return {**{f"best_{k}": defined_or_none(best.get(k)) for k in names}, "best_step": best["step"],
            **earlier_stages_best(evals, metric),
            **{f"last_{k}": defined_or_none(last[k]) for k in names}, "last_step": last["step"],
            **{f"final_{k}": defined_or_none(v) for k, v in last.items() if k.startswith("train_") and defined(v)},
            **{f"last_{k}": v for k, v in last.items() if k.endswith("_error") and isinstance(v, str)},
            "degenerate": any(v for k, v in last.items() if k.endswith("degenerate"))}


def tables_of(evals: list[dict], metric: str) -> dict:
    """What an evaluation measured as a table rather than a number (NER's F1 per entity type, a classifier's
    confusion matrix), from the best and the last evaluation: for summary.json; the CSV row keeps the numbers."""
    if not evals:
        return {}
    best = best_of(final_stage(evals), metric)
    return {f"{which}_{k}": v for which, record in (("best", best), ("last", evals[-1]))
            for k, v in record.items() if isinstance(v, (dict, list))}


def config_hash(cfg) -> str:
    """What a run's numbers depend on, the seed left out: rows with the same hash are seeds of one configuration
    (the resolved config without where and how the run reports: checkpoint.identity). Settings that merely repeat
    the seed (`method.seed: ${seed}`, CURLoRA's sampling seed) are left out with it."""
    from lowrank_bench.checkpoint import fingerprint, identity

    tree = {k: v for k, v in identity(cfg).items() if k != "seed"}
    for path in seed_interpolations(OmegaConf.to_container(cfg, resolve=False)):
        *parents, leaf = path
        node = tree
        for key in parents:
            node = node.get(key, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(leaf, None)
    return fingerprint(tree)


def seed_interpolations(tree, path: tuple = ()) -> list[tuple]:
    """The paths of every value that is exactly `${seed}` in an unresolved config."""
    if isinstance(tree, dict):
        return [p for key, value in tree.items() for p in seed_interpolations(value, (*path, key))]
    return [path] if tree == "${seed}" else []


def summarize(cfg, task_name: str, metric: str, method, trainer, history, params: dict[str, int],
              wall_seconds: float, origin: dict[str, str], scores: dict) -> dict:
    """One result row: what ran, its measures (`scores`), its cost and where it came from."""
    steps = max(history.train_steps, 1)
    return {
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "method": method.name, "model": cfg.model.name, "task": task_name, "seed": cfg.seed,
        "config_hash": config_hash(cfg),
        "rank": method.rank if method.rank is not None else "",
        **params, "trainable_pct": round(100.0 * params["trainable_params"] / params["total_params"], 4),
        "metric": metric, **scores,
        "train_steps": history.train_steps, "train_samples": history.samples,
        "train_time_s": round(history.train_seconds, 3),
        "time_per_step_ms": round(1000 * history.train_seconds / steps, 3),
        "samples_per_s": round(history.samples / max(history.train_seconds, 1e-9), 2),
        "wall_time_s": round(wall_seconds, 3),
        "peak_mem_mb": trainer.memory.megabytes, "peak_mem_kind": trainer.memory.kind,
        "device": device_name(trainer.device), "precision": trainer.precision,
        "batch_size": cfg.trainer.batch_size, "lr": cfg.optimizer.lr,
        **origin,
    }


# -- writing ----------------------------------------------------------------------------------------------------
def write_run_files(cfg, run_dir: Path, summary: dict, tables: dict | None = None) -> None:
    """config_resolved.yaml and summary.json (the row, plus `tables`: see `tables_of`)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config_resolved.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(saved_config(cfg))))
    tmp = run_dir / "summary.json.tmp"
    tmp.write_text(json.dumps({**summary, **(tables or {})}, indent=2))
    os.replace(tmp, run_dir / "summary.json")


def saved_config(cfg) -> dict:
    """The resolved config as config_resolved.yaml keeps it, with `data_dir` after `output_dir`: the data folder the
    run read ($LRBENCH_DATA_DIR as an absolute path; null: none), so that evaluating the run again does not depend
    on the shell it is evaluated from (tasks.base.recorded_data_dir)."""
    from lowrank_bench.tasks.base import data_dir_record

    tree = OmegaConf.to_container(cfg, resolve=True)
    keys = [k for k in tree if k != "data_dir"]
    at = keys.index("output_dir") + 1 if "output_dir" in keys else len(keys)
    return {**{k: tree[k] for k in keys[:at]}, "data_dir": data_dir_record(), **{k: tree[k] for k in keys[at:]}}


def preflight(csv_path: Path, run_dir: Path) -> None:
    """Before anything slow: the results CSV is lrbench's (or new) and can be written and locked, the run folder and
    the cache folder can be written in, and a set LRBENCH_DATA_DIR exists. Each is tried, not guessed from
    permissions (root passes every permission check; /proc/... and read-only mounts refuse the write itself), and
    what the trial made is removed again."""
    from lowrank_bench.models import cache_dir
    from lowrank_bench.tasks.base import data_dir

    data_dir()
    csv_path = Path(csv_path)
    csv_setting = f"results_csv={csv_path} (LRBENCH_RESULTS_CSV)"
    if csv_path.is_dir():
        raise LrbenchError(f"results_csv={csv_path} is a folder; give a file path (LRBENCH_RESULTS_CSV)")
    if csv_path.is_file() and csv_path.stat().st_size:
        with open(csv_path, newline="", errors="replace") as handle:
            header = next(csv.reader(handle), [])
        if not {"method", "model", "task", "seed"} <= set(header):
            raise LrbenchError(f"results_csv={csv_path} is not an lrbench results file (its header lacks method, "
                               f"model, task, seed); give another path (LRBENCH_RESULTS_CSV)")
    with trial_folder(csv_path.parent, csv_path, csv_setting) as folder:
        try_lock(csv_path, csv_setting)
        try_write(folder, csv_path, csv_setting)
        if csv_path.is_file():
            try_append(csv_path, csv_setting)
    check_folder(Path(run_dir), f"output_dir / LRBENCH_OUTPUT_DIR ({run_dir})")
    check_folder(cache_dir(), f"LRBENCH_CACHE_DIR={cache_dir()}")


def check_output_root(overrides: list[str]) -> None:
    """Before Hydra makes a command's run folder under `output_dir` (where a file, or a read-only place, is its
    traceback): the root of this command line's `output_dir=` (else $LRBENCH_OUTPUT_DIR, else outputs) tried with
    `check_folder`. A command line that sets hydra.run.dir or hydra.sweep.dir itself is left to Hydra."""
    if any(o.lstrip("+~").startswith(("hydra.run.dir=", "hydra.sweep.dir=")) for o in overrides):
        return
    values = [o.split("=", 1)[1] for o in overrides if o.lstrip("+").startswith("output_dir=")]
    root = values[-1] if values else os.environ.get("LRBENCH_OUTPUT_DIR") or "outputs"
    check_folder(Path(root).expanduser(), f"output_dir={root} (LRBENCH_OUTPUT_DIR)")


def check_folder(folder: Path, setting: str) -> None:
    """`folder` is, or can be made as, a folder lrbench can write in: tried (a file written and removed; the
    folders the trial made removed again). `setting` names where the folder came from, for the message. Also for
    a command's output root before Hydra makes its run folder there (`output_dir`)."""
    with trial_folder(Path(folder), Path(folder), setting) as made:
        try_write(made, Path(folder), setting)


def unwritable(target: Path, doing: str, err: OSError, setting: str) -> LrbenchError:
    return LrbenchError(f"{target} is not writable: {doing} failed ({err.strerror or err}); {setting}: give a "
                        "folder that can be written")


@contextmanager
def trial_folder(folder: Path, target: Path, setting: str):
    """`folder`, made (with its missing parents) for a trial write; the folders this made are removed after it."""
    folder = Path(folder)
    missing = []
    existing = folder
    while not existing.exists() and existing != existing.parent:
        missing.append(existing)
        existing = existing.parent
    if not existing.is_dir():
        raise LrbenchError(f"{target} is not writable: {existing} is a file, not a folder ({setting})")
    made: list[Path] = []
    try:
        for path in reversed(missing):
            try:
                path.mkdir()
            except FileExistsError:  # a concurrent job made it: not ours to remove
                continue
            except OSError as err:
                raise unwritable(target, f"making the folder {path}", err, setting) from None
            made.append(path)
        yield folder
    finally:
        for path in reversed(made):
            try:
                path.rmdir()  # only if still empty: a concurrent job may have written there meanwhile
            except OSError:
                break


def try_write(folder: Path, target: Path, setting: str) -> None:
    """A file created (exclusively, under a name of its own) and removed in `folder`."""
    probe = folder / f".lrbench-probe-{platform.node()}-{os.getpid()}"
    try:
        handle = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.close(handle)
        os.unlink(probe)
    except OSError as err:
        raise unwritable(target, f"writing a file in {folder}", err, setting) from None


def try_append(path: Path, setting: str) -> None:
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_APPEND))
    except OSError as err:
        raise unwritable(path, "opening it for appending", err, setting) from None


def try_lock(csv_path: Path, setting: str) -> None:
    """The CSV's lock file opened (made, if new, then removed) and locked once: a writer that cannot lock waits
    300 s at the end of the run and dies; this finds out before the run. Contention means locks work."""
    import errno
    import fcntl

    lock = Path(str(csv_path) + ".lock")
    made = not lock.exists()
    try:
        handle = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise unwritable(csv_path, f"opening its lock file {lock.name}", err, setting) from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(handle, fcntl.LOCK_UN)
    except OSError as err:
        if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.ENOSYS):  # held by a writer / filelock's soft lock
            raise unwritable(csv_path, f"locking {lock.name}", err, setting) from None
    finally:
        os.close(handle)
        if made:
            lock.unlink(missing_ok=True)


def release_log_files(folder: Path) -> None:
    """Hydra's job log handler (train.log) in a folder about to be deleted: closed and detached from the root logger
    first, so that later logging in this process (the next in-process run, a sweep's next job) does not reopen a
    file in a folder that is gone."""
    import logging

    folder = Path(folder).resolve()
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).resolve().is_relative_to(folder):
            root.removeHandler(handler)
            handler.close()


def discard_untouched(run_dir: Path, output_root: Path) -> None:
    """A command refused before it wrote anything leaves no folder: Hydra made it (its .hydra/ and the job's log),
    and the folders above it up to `output_root` when they hold nothing else."""
    import shutil

    run_dir = Path(run_dir)
    if not (run_dir.is_dir() and all(p.name == ".hydra" or p.suffix == ".log" for p in run_dir.iterdir())):
        return
    release_log_files(run_dir)
    shutil.rmtree(run_dir, ignore_errors=True)
    root, folder = Path(output_root).resolve(), run_dir.resolve().parent
    while folder.is_relative_to(root):
        try:
            folder.rmdir()  # only an empty folder goes
        except OSError:
            break
        folder = folder.parent


def write_status(run_dir: Path, status: str) -> None:
    """`<run>/status`: running, finished, diverged, interrupted (checkpointed by a signal, to be resumed) or
    failed."""
    tmp = run_dir / "status.tmp"
    tmp.write_text(status + "\n")
    os.replace(tmp, run_dir / "status")


def append_row(path: Path, row: dict) -> None:
    """Append one row under an exclusive lock. A row with a new column rewrites the file (atomically) with the
    union of the columns; otherwise the row is one write() at the end of the file."""
    path = Path(path)
    try:  # filelock retries a lock file it cannot open until its timeout (300 s): fail at once instead
        path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(str(path) + ".lock", os.O_RDWR | os.O_CREAT, 0o644))
    except OSError as err:
        raise LrbenchError(f"results_csv={path}: cannot open its lock file ({err.strerror}); the row is not written "
                           f"(python -m lowrank_bench.collect adds it from the run's summary.json)") from None
    with csv_lock(path):
        header: list[str] = []
        if path.is_file() and path.stat().st_size > 0:
            heal(path)
            with open(path, newline="") as handle:
                header = next(csv.reader(handle), [])
        new = [k for k in row if k not in header]
        if header and not new:
            with open(path, "a", newline="") as handle:
                handle.write(render_rows(header, [row], with_header=False))
            return
        replace_rows(path, header + new, whole_rows(path, header) + [row])


def whole_rows(path: Path, header: list[str]) -> list[dict]:
    """Every row of the file whose cells fit its header; a ragged one (more cells than the header: not ours to guess)
    moves to `<csv>.torn`, kept whole for a person to judge. Call under `csv_lock`, after `heal`."""
    if not header:
        return []
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    ragged = [r for r in rows if None in r]
    if ragged:
        cells = io.StringIO()
        csv.writer(cells, lineterminator="\n").writerows([r[h] for h in header] + r[None] for r in ragged)
        quarantine(path, cells.getvalue())
    return [r for r in rows if None not in r]


def csv_lock(path: Path) -> FileLock:
    """The results CSV's exclusive lock (`<csv>.lock`), held by every writer of the file."""
    return FileLock(str(path) + ".lock", timeout=300)


def replace_rows(path: Path, columns: list[str], rows: list[dict]) -> None:
    """Rewrite the whole file atomically (a temp file beside it, then a rename): `columns` in lrbench's order, then
    `rows`. Call under `csv_lock`."""
    tmp = path.with_suffix(f".{platform.node()}.{os.getpid()}.tmp")  # the host too: nodes share the folder
    tmp.write_text(render_rows(order_columns(columns), rows, with_header=True))
    os.replace(tmp, path)


def row_of(summary: dict) -> dict:
    """The CSV row a run appended, from its summary.json: `write_run_files` wrote the row and then the tables
    (`tables_of`: the only dict and list values) beside it."""
    return {k: v for k, v in summary.items() if not isinstance(v, (dict, list))}


def heal(path: Path) -> None:
    """A row torn by a writer killed mid-write (the file does not end in a newline) moves to `<csv>.torn`, so that
    the next row starts on a line of its own. Call under the file's lock."""
    data = path.read_bytes()
    if data.endswith(b"\n"):
        return
    cut = data.rfind(b"\n") + 1
    quarantine(path, data[cut:].decode(errors="replace") + "\n")
    with open(path, "r+b") as handle:
        handle.truncate(cut)


def quarantine(path: Path, text: str) -> None:
    with open(path.with_name(path.name + ".torn"), "a") as handle:
        handle.write(text)
    from lowrank_bench.console import console

    console.print(f"[yellow]{path}: {text.count(chr(10))} damaged row(s) moved to {path.name}.torn")


def order_columns(columns: list[str]) -> list[str]:
    lead = [c for c in LEADING_COLUMNS if c in columns]
    return lead + [c for c in columns if c not in lead]


def render_rows(columns: list[str], rows: list[dict], with_header: bool) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, restval="", extrasaction="raise", lineterminator="\n")
    if with_header:
        writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def read_rows(path: Path) -> list[dict]:
    if not Path(path).is_file():
        return []
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


# -- loggers ----------------------------------------------------------------------------------------------------
WANDB_MODES = ("online", "offline", "disabled")


class WandbLogger:
    """wandb behind `logger=wandb` (docs/results.md, Tracking): the settings of lowrank_bench/conf/logger/wandb.yaml
    (the command line, then WANDB_*, then the YAML), the run in the group of its config hash, named by the overrides
    that differ; evaluations as they come (a continual run's re-evaluations under `continual/<metric>/<task>`), the
    summary and the adapter file as a `model` artifact at the end."""

    def __init__(self, cfg, run_dir: Path):
        wandb = require("wandb", "wandb", "logger=wandb")

        lc = cfg.logger
        self.run_dir = run_dir
        self.config_hash = config_hash(cfg)
        self.run = wandb.init(project=lc.project, entity=lc.get("entity"), mode=lc.mode,
                              dir=str(lc.get("dir") or run_dir), group=lc.get("group") or self.config_hash,
                              name=lc.get("run_name") or run_name(cfg), tags=wandb_tags(lc),
                              config=OmegaConf.to_container(cfg, resolve=True), reinit="finish_previous")

    def __call__(self, record: dict, step: int) -> None:
        self.run.log(loggable(record), step=step)

    def log_matrix(self, tasks: list[str], rows: list[list[float | None]], plot: Path) -> None:
        """A continual run's accuracy matrix as a wandb Table, and its forgetting curve as an image."""
        import wandb

        table = wandb.Table(columns=["after_stage", *tasks],
                            data=[[f"{i + 1}: {tasks[i]}", *row] for i, row in enumerate(rows)])
        self.run.log({"accuracy_matrix": table, "forgetting_curve": wandb.Image(str(plot))})

    def finish(self, summary: dict | None) -> None:
        if summary:
            self.run.summary.update(summary)
            self.log_adapter(summary)
        self.run.finish(exit_code=0 if summary else 1)

    def log_adapter(self, summary: dict) -> None:
        """The run's adapter.safetensors (when it saved one) as a `model` artifact named after the run."""
        import wandb

        adapter = self.run_dir / "adapter.safetensors"
        if not adapter.is_file():
            return
        artifact = wandb.Artifact(f"adapter-{self.run.id}", type="model", metadata={
            "config_hash": self.config_hash, **{k: summary.get(k) for k in ("method", "model", "task", "seed")}})
        artifact.add_file(str(adapter))
        self.run.log_artifact(artifact)


def loggable(record: dict) -> dict:
    """A record's numbers for wandb. A continual run's re-evaluation of task T after a stage goes under
    `continual/<metric>/T` (under the plain names it would overwrite the current task's values at that step); its
    perplexity measurements under `continual/perplexity`, ..."""
    numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k not in ("stage_index",)}
    if "after_stage" in record and "task" in record:
        return {f"continual/{k}/{record['task']}": v for k, v in numbers.items()}
    if "perplexity_after" in record:
        return {f"continual/{k}": v for k, v in numbers.items()}
    return numbers


def wandb_tags(logger_cfg) -> list[str]:
    """`logger.tags`, then those of WANDB_TAGS (comma-separated) not already there."""
    tags = [str(t) for t in logger_cfg.get("tags") or []]
    extra = [t.strip() for t in os.environ.get("WANDB_TAGS", "").split(",") if t.strip()]
    return tags + [t for t in extra if t not in tags]


def run_name(cfg) -> str:
    """What tells this run from its neighbours: a sweep job's folder name (`3_method=lora,seed=1`: what the jobs
    vary, configs.job_folder), a single run's command-line overrides (Hydra's override_dirname), or, outside Hydra or
    with no override, method-task-model-seed."""
    from lowrank_bench.configs import job_folder

    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hydra = HydraConfig.get()
    except (ImportError, ValueError):  # not inside a Hydra job (a library call)
        hydra = None
    overrides = hydra.job.override_dirname if hydra else ""
    if overrides:
        return job_folder(hydra.job.num, overrides) if hydra.mode == RunMode.MULTIRUN else overrides
    return f"{cfg.method.name}-{cfg.task.name}-{cfg.model.name}-s{cfg.seed}"


def make_logger(cfg, run_dir: Path):
    """The run's logger: a WandbLogger with `logger=wandb`, unless its mode (or WANDB_MODE) is `disabled`; else
    None."""
    lc = cfg.logger
    if lc.get("name") != "wandb":
        return None
    if lc.mode not in WANDB_MODES:
        raise LrbenchError(f"logger.mode={lc.mode} (or WANDB_MODE): choose {', '.join(WANDB_MODES)}")
    return WandbLogger(cfg, run_dir) if lc.mode != "disabled" else None


# -- display ----------------------------------------------------------------------------------------------------
def print_summary(summary: dict, csv_path: Path | None = None, console: Console | None = None) -> None:
    """The run's table, then where it wrote: its folder and the CSV its row went to."""
    table = Table(title=f"{summary['method']} · {summary['model']} · {summary['task']} · seed {summary['seed']}")
    table.add_column("field")
    table.add_column("value", justify="right")
    shown = ["status", "diverged_at_step", "trainable_params", "adapter_params", "head_params", "trainable_pct",
             "best_step"]
    shown += [k for k in summary if k.startswith(("best_", "last_", "final_")) and k not in ("best_step", "last_step")]
    shown += [k for k in summary if k.startswith(("mc_accuracy", "mc_macro_accuracy", "mc_items", "sft_"))]
    if summary.get("mode") == "eval":  # an evaluation's measures carry their plain names, after `metric`
        keys = list(summary)
        shown += [k for k in keys[keys.index("metric") + 1:keys.index("evaluated_run")] if k != "degenerate"]
        shown += ["evaluated_run"]
    shown += ["backward_transfer", "average_forgetting", "forward_transfer", "ppl_before", "ppl_after", "degenerate",
              "train_steps", "time_per_step_ms", "samples_per_s", "wall_time_s", "peak_mem_mb", "device", "git_commit"]
    for key in [k for k in shown if k in summary]:
        value = summary.get(key)
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    console = console or stdout_console
    console.print(table)
    console.print(f"run folder: {summary.get('run_dir', '?')}", soft_wrap=True, highlight=False)
    if csv_path is not None:
        console.print(f"row appended to: {csv_path}", soft_wrap=True, highlight=False)

