"""Checkpoints and resume: a run continues bit for bit where it stopped.

A checkpoint is written every `trainer.checkpoint_every` loop steps (0: never between stage ends), at the end of
every stage (after its evaluation and stage-end hooks) and, on SIGTERM, SIGUSR1 or SIGUSR2 (what SLURM and
submitit send before preemption or the time limit) or SIGINT (Ctrl-C), at the next step boundary, after which the
run stops (`Signals`: a second Ctrl-C stops at once). Layout, in the run folder:

    checkpoints/latest                 JSON: the current checkpoint's folder, the config fingerprint, finished
    checkpoints/step-00000120/
        meta.json                      position (stage, step), the loop's counters, the metrics history, the
                                       step rule's scalars (schedulers, data streams, bi-level counts), the
                                       stage-end hooks' state (a continual run's matrix), Python and NumPy RNG
                                       states, the size of metrics.jsonl, the run's config (its identity)
        tensors.safetensors            every parameter trained in some stage, the buffers of their modules, the
                                       stages' snapshots, the data streams' permutations, the data generator's
                                       and torch's (and CUDA's) RNG states, per rank
        optimizer.pt                   the optimisers' states (torch.save; read back with weights_only=True)

A checkpoint is written into a temporary folder, renamed into place, and only then does `latest` (written to a
temporary file and os.replace'd) point to it; the previous checkpoint is removed after that. A run killed at any
moment leaves `latest` pointing to a complete checkpoint. When the run has finished (its row written), the folder
is removed (`trainer.keep_checkpoint=true` keeps the last one, marked finished).

Identity: a checkpoint belongs to the composed config minus the keys in EXCLUDED (where and how the run reports,
not what it computes). `trainer.resume=auto` continues the most recent unfinished checkpoint of the same identity
under `output_dir`; `trainer.resume=<path>` a given one (a run folder, its checkpoints/ folder or a checkpoint
folder), refused with the differing keys listed when the identity differs. With `trainer.resume=null` (the
default) a run still continues a checkpoint of its own config found in its own run folder: that is a job re-run
by its launcher after preemption (submitit and SLURM requeue the job with the same folder). A resumed run writes
into the folder of the checkpoint it continues: one metrics.jsonl (cut back to its length at the checkpoint), one
adapter, one summary and one result row.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file

from lowrank_bench.console import console
from lowrank_bench.errors import LrbenchError

FORMAT = 1
EXCLUDED = ("trainer.resume", "trainer.checkpoint_every", "trainer.keep_checkpoint", "trainer.progress",
            "trainer.log_every", "logger", "results_csv", "output_dir", "save_adapter")
SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT")  # what launchers send before the end, and Ctrl-C
FOLDER = "checkpoints"


# -- identity -----------------------------------------------------------------------------------------------------
def identity(cfg: DictConfig) -> dict:
    """The resolved config without the EXCLUDED keys: what a checkpoint must share with the run that resumes it."""
    tree = OmegaConf.to_container(cfg, resolve=True)
    tree.pop("hydra", None)
    for dotted in EXCLUDED:
        *parents, leaf = dotted.split(".")
        node = tree
        for key in parents:
            node = node.get(key, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(leaf, None)
    return tree


def fingerprint(tree: dict) -> str:
    return hashlib.sha256(json.dumps(tree, sort_keys=True, default=str).encode()).hexdigest()[:16]


def flatten(tree, prefix: str = "") -> dict[str, object]:
    if isinstance(tree, dict) and tree:
        out = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def differences(theirs: dict, ours: dict) -> list[str]:
    """`key: checkpoint value -> this run's value` for each key that differs."""
    a, b = flatten(theirs), flatten(ours)
    missing = "(absent)"
    return [f"{k}: {a.get(k, missing)!r} -> {b.get(k, missing)!r}" for k in sorted(set(a) | set(b))
            if a.get(k, missing) != b.get(k, missing)]


# -- checkpoints on disk ------------------------------------------------------------------------------------------
@dataclass
class Checkpoint:
    path: Path
    meta: dict

    @property
    def run_dir(self) -> Path:
        return self.path.parent.parent

    @property
    def fingerprint(self) -> str:
        return self.meta["fingerprint"]

    def tensors(self) -> dict[str, torch.Tensor]:
        return load_file(str(self.path / "tensors.safetensors"))

    def optimizers(self) -> dict:
        return torch.load(self.path / "optimizer.pt", map_location="cpu", weights_only=True)

    def describe(self) -> str:
        p = self.meta["position"]
        return (f"{self.path} (stage {p['stage']} '{p['stage_name']}', step {p['step']}, "
                f"loop step {self.meta['global_step']})")


def pointer(run_dir: Path) -> dict | None:
    try:
        return json.loads((Path(run_dir) / FOLDER / "latest").read_text())
    except (OSError, ValueError):
        return None


def read_meta(path: Path) -> dict:
    """meta.json of the checkpoint folder `path`; one that is not a JSON object is one line naming it."""
    meta = path / "meta.json"
    try:
        value = json.loads(meta.read_bytes().decode("utf-8"))
    except (OSError, ValueError) as err:
        raise LrbenchError(damaged(path, f"{meta} is not valid JSON ({err})")) from None
    if not isinstance(value, dict):
        raise LrbenchError(damaged(path, f"{meta} is a JSON {type(value).__name__}, not an object"))
    return value


def damaged(path: Path, problem: str) -> str:
    return (f"checkpoint {path} is damaged: {problem}; delete {path.parent.parent / FOLDER} to start this run afresh "
            "(or give trainer.resume=<another checkpoint>)")


#: what a resume reads from meta.json before anything else
META_KEYS = ("format", "fingerprint", "identity", "position", "global_step", "wall_s")


def check_whole(checkpoint: Checkpoint) -> None:
    """The checkpoint a run is about to continue is whole: meta.json holds what a resume reads, tensors.safetensors
    is a safetensors file its header covers, optimizer.pt a whole zip archive (torch.save's format). Else one line
    naming the file: resuming it would crash mid-way, and starting afresh in silence would throw its progress away."""
    import zipfile

    from safetensors import safe_open

    path = checkpoint.path
    lacking = [key for key in META_KEYS if key not in checkpoint.meta]
    if lacking:
        raise LrbenchError(damaged(path, f"{path / 'meta.json'} lacks {lacking}"))
    tensors = path / "tensors.safetensors"
    try:
        with safe_open(str(tensors), "pt"):
            pass
    except Exception as err:  # noqa: BLE001 (safetensors' own error type, or a missing file)
        raise LrbenchError(damaged(path, f"{tensors} is not a whole safetensors file "
                                         f"({str(err).split(': ', 1)[-1]})")) from None
    optimizer = path / "optimizer.pt"
    if not (optimizer.is_file() and zipfile.is_zipfile(optimizer)):
        raise LrbenchError(damaged(path, f"{optimizer} is missing or not a whole torch.save file"))


def load(path: Path) -> Checkpoint | None:
    """The checkpoint at `path`: a checkpoint folder, a run's checkpoints/ folder or a run folder (its latest)."""
    path = Path(path)
    if (path / "meta.json").is_file():
        return Checkpoint(path, read_meta(path))
    for run_dir in (path, path.parent):
        latest = pointer(run_dir)
        if latest and (run_dir / FOLDER / latest["checkpoint"] / "meta.json").is_file():
            return load(run_dir / FOLDER / latest["checkpoint"])
    return None


def unfinished_under(root: Path, print_: str) -> list[tuple[float, Path]]:
    """(time written, run folder) of every unfinished checkpoint with fingerprint `print_` under `root`."""
    found = []
    for latest in Path(root).glob(f"**/{FOLDER}/latest"):
        entry = pointer(latest.parent.parent)
        if entry and entry.get("fingerprint") == print_ and not entry.get("finished"):
            found.append((entry.get("written_at", 0.0), latest.parent.parent))
    return sorted(found)


def find(cfg: DictConfig, run_dir: Path, check=lambda checkpoint: None) -> Checkpoint | None:
    """The checkpoint this run continues, per `trainer.resume` (see the module's docstring), or None. `check` is
    called on it before it is announced (`check_whole`: a damaged checkpoint is one line, not a crash)."""
    wanted = cfg.trainer.get("resume")
    tree = identity(cfg)
    ours = fingerprint(tree)
    if wanted in (None, "", "null", "none"):
        own = load(run_dir) if pointer(run_dir) else None
        if own is None or own.meta.get("finished"):
            return None
        if own.fingerprint != ours:
            console.print(f"[yellow]{run_dir} holds a checkpoint of another config; starting afresh (it will be "
                          "replaced)")
            return None
        check(own)
        console.print(f"continuing this run folder's checkpoint {own.describe()}")
        return own
    if wanted == "auto":
        found = unfinished_under(Path(cfg.output_dir), ours)
        if not found:
            console.print(f"trainer.resume=auto: no unfinished checkpoint of this config under {cfg.output_dir}; "
                          "starting afresh")
            return None
        checkpoint = load(found[-1][1])
        check(checkpoint)
        console.print(f"trainer.resume=auto: continuing {checkpoint.describe()}")
        return checkpoint
    checkpoint = load(Path(wanted))
    if checkpoint is None:
        raise LrbenchError(f"trainer.resume={wanted}: no checkpoint there; give a run folder (with "
                           f"{FOLDER}/latest), its {FOLDER}/ folder or one checkpoint folder, or trainer.resume=auto")
    if checkpoint.meta.get("format") != FORMAT:
        raise LrbenchError(f"trainer.resume={wanted}: checkpoint format {checkpoint.meta.get('format')}, this "
                           f"version reads format {FORMAT}")
    if checkpoint.fingerprint != ours:
        diff = differences(checkpoint.meta["identity"], tree)
        shown = "; ".join(diff[:12]) + (f"; and {len(diff) - 12} more" if len(diff) > 12 else "")
        raise LrbenchError(f"trainer.resume={wanted}: the checkpoint belongs to another config; {len(diff)} key(s) "
                           f"differ (checkpoint -> this run): {shown}. Resume with the checkpoint's config, or "
                           "leave trainer.resume unset to start afresh")
    if checkpoint.meta.get("finished"):
        raise LrbenchError(f"trainer.resume={wanted}: that run finished (its row is written); nothing to resume")
    check(checkpoint)
    console.print(f"resuming {checkpoint.describe()}")
    return checkpoint


class Store:
    """The run folder's checkpoints: atomic writes, the `latest` pointer, one checkpoint kept."""

    def __init__(self, run_dir: Path, tree: dict, keep: bool = False):
        self.folder = Path(run_dir) / FOLDER
        self.identity, self.fingerprint, self.keep = tree, fingerprint(tree), keep
        self.count, self.seconds = 0, 0.0  # written by this process, and the time its checkpoints took

    def write(self, name: str, meta: dict, tensors: dict[str, torch.Tensor], optimizers: dict) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        final = self.folder / name
        tmp = self.folder / f".tmp-{name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        meta = {"format": FORMAT, "fingerprint": self.fingerprint, "identity": self.identity,
                "written": datetime.now(timezone.utc).isoformat(timespec="seconds"), **meta}
        write_synced(tmp / "meta.json", json.dumps(meta).encode())
        save_file(unshared(tensors), str(tmp / "tensors.safetensors"))
        torch.save(optimizers, tmp / "optimizer.pt")
        for f in ("tensors.safetensors", "optimizer.pt"):
            sync(tmp / f)
        if final.exists():  # renamed into place by a process killed before `latest` moved; we got here again
            shutil.rmtree(final)
        os.rename(tmp, final)
        self.point(name)
        for old in self.folder.iterdir():
            if old.name not in (name, "latest") and not old.name.startswith(".tmp-latest"):
                shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
        self.count += 1
        return final

    def point(self, name: str, finished: bool = False) -> None:
        entry = {"checkpoint": name, "fingerprint": self.fingerprint, "finished": finished, "written_at": time.time()}
        tmp = self.folder / f".tmp-latest-{os.getpid()}"
        write_synced(tmp, json.dumps(entry).encode())
        os.replace(tmp, self.folder / "latest")
        sync_dir(self.folder)

    def finish(self) -> None:
        """The run's row is written: its checkpoints are no longer needed (kept, marked finished, on request)."""
        latest = pointer(self.folder.parent)
        if latest is None:
            return
        if not self.keep:
            shutil.rmtree(self.folder, ignore_errors=True)
            return
        meta_path = self.folder / latest["checkpoint"] / "meta.json"
        meta = json.loads(meta_path.read_text())
        meta["finished"] = True
        write_synced(meta_path, json.dumps(meta).encode())
        self.point(latest["checkpoint"], finished=True)


def unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors, none sharing memory with another (safetensors refuses shared storage)."""
    out, seen = {}, set()
    for key, value in tensors.items():
        t = value.detach().cpu().contiguous()
        if t.untyped_storage().data_ptr() in seen:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[key] = t
    return out


def write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def sync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_dir(path: Path) -> None:
    try:
        sync(path)
    except OSError:  # some file systems cannot fsync a directory
        pass


# -- random number generators -------------------------------------------------------------------------------------
def rng_state() -> tuple[dict, dict[str, torch.Tensor]]:
    """Python's, NumPy's, torch's and CUDA's global RNG states: JSON scalars and tensors."""
    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    scalars = {"python": [version, list(words), gauss],
               "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]}
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return scalars, tensors


def set_rng_state(scalars: dict, tensors: dict[str, torch.Tensor]) -> None:
    version, words, gauss = scalars["python"]
    random.setstate((version, tuple(words), gauss))
    kind, keys, pos, has_gauss, cached = scalars["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[f"cuda{i}"] for i in range(torch.cuda.device_count()) if f"cuda{i}" in tensors]
    if cuda:
        torch.cuda.set_rng_state_all(cuda)


# -- signals ------------------------------------------------------------------------------------------------------
class Interrupted(Exception):
    """A signal stopped the run at a step boundary, after a checkpoint."""

    def __init__(self, signum: int, path: Path | None, previous):
        self.signum, self.path, self.previous = signum, path, previous
        super().__init__(f"{signal.Signals(signum).name}: stopped after checkpoint {path}")

    def hand_over(self) -> None:
        """What the signal would have done without us: the handler it had before (submitit's requeues the job and
        exits), else exit with 128 + the signal's number, as a process killed by it would. Python's own Ctrl-C
        handler (it raises KeyboardInterrupt: a traceback) is not handed the stop: exit 130 says it."""
        if callable(self.previous) and self.previous is not signal.default_int_handler:
            self.previous(self.signum, None)
        raise SystemExit(128 + self.signum)


class Signals:
    """While active, SIGTERM/SIGUSR1/SIGUSR2 and SIGINT (Ctrl-C) only set `received`; the loop checkpoints and
    stops at the next step boundary. A second Ctrl-C while that stop is pending raises KeyboardInterrupt at once
    (`latest` still points at the last complete checkpoint). A SIGINT the process was started ignoring (a
    background job of a non-interactive shell) stays ignored. The handlers in place before (submitit's) are kept
    and handed the signal afterwards.

    `at_once()`, for what follows training: a signal raises `Interrupted` at once, naming `last` (the last
    checkpoint written or resumed: the end of training, which a resume continues from)."""

    def __init__(self):
        self.received: int | None = None
        self.previous: dict[int, object] = {}
        self.last: Path | None = None  # the last checkpoint written (or resumed from)
        self.immediate = False

    def __enter__(self):
        for name in SIGNALS:
            signum = getattr(signal, name, None)
            if signum is None:
                continue
            if signum == signal.SIGINT and signal.getsignal(signum) is signal.SIG_IGN:
                continue
            try:
                self.previous[signum] = signal.signal(signum, self.handle)
            except ValueError:  # not the main thread: leave signals alone
                break
        return self

    def handle(self, signum, frame) -> None:
        # Only a flag, or an exception: a handler runs between two bytecodes of whatever the main thread does, which
        # may be the first import of a module (rich imports its emoji table lazily, on the first print); printing
        # from here would then import that half-executed module and fail. The loop reports the stop at the step
        # boundary; the exceptions are reported by whoever catches them.
        if self.immediate:
            raise Interrupted(signum, self.last, self.previous.get(signum))
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt(f"a second {signal.Signals(signum).name} while a stop was pending")
        if self.received is None:
            self.received = signum

    @contextmanager
    def at_once(self):
        """While active (and the handlers installed), a signal stops at once with `Interrupted(signum, last)`."""
        self.immediate = True
        try:
            with self:
                yield self
        finally:
            self.immediate = False

    def __exit__(self, *exc) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}

    def interrupted(self, path: Path | None) -> Interrupted:
        return Interrupted(self.received, path, self.previous.get(self.received))


def find_on_main(cfg: DictConfig, run_dir: Path, dp) -> Checkpoint | None:
    """`find` on rank 0, its answer (or its error) on every rank."""
    found, error = None, None
    if dp.is_main:
        try:
            found = find(cfg, run_dir, check_whole)
        except LrbenchError as err:
            error = str(err)
    path, error = dp.broadcast((str(found.path) if found else None, error))
    if error:
        raise LrbenchError(error)
    return found if dp.is_main else (load(Path(path)) if path else None)


def within(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
