# Two commands do everything on a fresh machine:
#   make quickstart   install into .venv, then run params/quickstart.yaml (offline, CPU, minutes)
#   make test         install into .venv, then run the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
# A CPU build of torch keeps the install small on machines without a GPU; GPU users install
# from environment.yml (conda) instead.
TORCH  ?= torch==2.13.0
# A trained sparse (LexMAE) model folder for bench/sparse_search.py, e.g. make bench SPARSE_MODEL=outputs/<run>/<stage>/model;
# without one that benchmark prints "skipped".
SPARSE_MODEL ?=
# Stages run at once by `make miniatures` (reprolib run --jobs); 2 saves about a fifth on 2 cores.
JOBS ?= 1

.PHONY: install quickstart miniatures test bench clean

$(BIN)/reprolib: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[faiss,test]"
	touch $@

install: $(BIN)/reprolib

quickstart: install
	$(BIN)/reprolib run params/quickstart.yaml

miniatures: install   # each paper's central claim against its control, 3 seeds; see README (JOBS=2: 2 stages at once)
	for yaml in params/miniature/*.yaml; do $(BIN)/reprolib run $$yaml --jobs $(JOBS) || exit 1; done

test: install
	$(BIN)/python -m pytest -q

bench: install   # about 70 minutes on 2 cores; results in bench/results/
	$(BIN)/python bench/corpus_access.py
	$(BIN)/python bench/encode_throughput.py
	$(BIN)/python bench/encode_rss.py
	$(BIN)/python bench/train_throughput.py
	$(BIN)/python bench/scifact_zero_shot.py
	$(BIN)/python bench/faiss_blas.py
	$(BIN)/python bench/sparse_search.py $(if $(SPARSE_MODEL),--model $(SPARSE_MODEL))
	$(BIN)/python bench/fusion_teacher.py
	$(BIN)/python bench/retromae_step.py
	$(BIN)/python bench/retromae_synthetic.py
	$(BIN)/python bench/kernel_start.py
	REPROLIB_FORK_KERNELS=0 $(BIN)/python bench/kernel_start.py --out bench/results/kernel_start_fresh.json

clean:
	rm -rf $(VENV) outputs/quickstart
