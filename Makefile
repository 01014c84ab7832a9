# Everything runs from a virtual environment in .venv, made on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
MODEL  ?= 124M
PROMPT ?= Alan Turing theorized that computers would one day
N      ?= 50
MODELS ?= models

.PHONY: install browser run serve test fuzz bench bench-peers bench-serve bench-ray deploy-check clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[convert,serve,ray,structured,onednn,test]'
	touch $@

## install: the runtime, its extras, the converter (TensorFlow) and the test tools, into .venv
install: $(STAMP)

## run: download and convert MODEL once (into models/MODEL), then continue PROMPT
run: install
	@test -f $(MODELS)/$(MODEL)/model.safetensors || $(BIN)/gpt-convert $(MODEL) $(MODELS)/$(MODEL)
	$(BIN)/gpt-run $(MODELS)/$(MODEL) "$(PROMPT)" -n $(N)

## serve: download and convert MODEL once, then serve it with gpt-serve on 127.0.0.1:8000
serve: install
	@test -f $(MODELS)/$(MODEL)/model.safetensors || $(BIN)/gpt-convert $(MODEL) $(MODELS)/$(MODEL)
	$(BIN)/gpt-serve $(MODELS)/$(MODEL) $(SERVE_ARGS)

## browser: Debian's chromium for the page tests (gpt-explain, the playground), installed with apt-get if missing
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || { \
	  echo "installing chromium (apt-get) for the browser tests"; \
	  $(SUDO) apt-get update -qq && $(SUDO) DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }

## test: the whole test suite (it includes the TensorFlow-free deployment check and a headless
##       browser), then the model, engine and server tests again on NumPy's matmul path; a
##       screenshots of the gpt-explain page and of the playground land in test-artifacts/
test: install browser
	$(BIN)/python -m pytest -q
	GPT2NP_MATMUL=numpy $(BIN)/python -m pytest -q $(NUMPY_PATH_TESTS)

# The model's, the engine's and the server's tests again with NumPy's products (the run above uses
# oneDNN's where the extra is installed, as `auto` does): both paths pass them.
NUMPY_PATH_TESTS := tests/core/test_model.py tests/core/test_reference.py tests/core/test_engine.py \
                    tests/core/test_generation.py tests/core/test_sampling.py tests/core/test_score.py \
                    tests/core/test_prefix_cache.py tests/core/test_api.py tests/serve/test_serve.py

## fuzz: the fuzz tests with a large budget (20,000 examples each; CI runs 200)
fuzz: install
	GPT2NP_FUZZ_EXAMPLES=$${GPT2NP_FUZZ_EXAMPLES:-20000} $(BIN)/python -m pytest -q tests/core/test_fuzz.py

## bench: speed against this machine's ceilings, what a constraint costs, then beside CTranslate2 and
##        transformers if installed (see bench-peers); writes bench/results/{RESULTS,STRUCTURED,MATMUL,
##        PRECISION,PEERS}.md
##        with their .json and .png
bench: install
	$(BIN)/pip install --quiet -e '.[bench]'
	$(BIN)/python bench/bench.py $(BENCH_ARGS)
	$(BIN)/python bench/structured_bench.py
	$(BIN)/python bench/matmul_bench.py
	$(BIN)/python bench/precision_bench.py
	$(BIN)/python bench/peers_bench.py

## bench-peers: install CTranslate2 and transformers (torch CPU), then gpt2np beside them; writes bench/results/PEERS.md
bench-peers: install
	$(BIN)/pip install --quiet -e '.[bench,bench-peers]'
	$(BIN)/python bench/peers_bench.py $(BENCH_ARGS)

## bench-serve: gpt-serve under load on loopback, then its prefix cache on against off (and vLLM's CPU
##              build beside it when installed, see bench/prefix_bench.py); writes bench/results/{SERVE,PREFIX}.md;
##              with LLAMA_SERVER=path/to/llama-server GGUF=dir (124M-{f32,f16,q8_0}.gguf), gpt-serve's weight
##              precisions beside llama.cpp's (bench/precision_serve_bench.py, SERVE-PRECISION.md)
bench-serve: install
	$(BIN)/pip install --quiet -e '.[bench]'
	$(BIN)/python bench/serve_bench.py $(BENCH_ARGS)
	$(BIN)/python bench/prefix_bench.py
	$(if $(LLAMA_SERVER),$(BIN)/python bench/precision_serve_bench.py --llama-server $(LLAMA_SERVER) --gguf $(GGUF))

## bench-ray: the Ray Data stage against one process doing the same work; writes bench/results/{RAY.md,ray.json}
bench-ray: install
	$(BIN)/pip install --quiet -e '.[bench]'
	$(BIN)/python bench/ray_bench.py $(BENCH_ARGS)

## deploy-check: the runtime wheel alone, in a fresh venv, runs a converted model
deploy-check: install
	VENV=$(VENV) scripts/deploy-check

clean:
	rm -rf $(VENV) build dist *.egg-info runtime/*.egg-info converter/*.egg-info .pytest_cache .hypothesis
