# Two commands set up a fresh machine: `make demo` runs the main job, `make test` passes the tests.
VENV ?= .venv
PY := $(VENV)/bin/python
FVPATCH := $(VENV)/bin/fvpatch

.PHONY: setup demo test test-shuffled test-big test-stock test-offload llama-tools bench
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[train,test]'
	touch $@

demo: setup
	mkdir -p out
	$(FVPATCH) save -p "Egypt -> Cairo, Norway -> Oslo, Estonia ->" --save l_out-10 out/capital.safetensors --token-idx -1 -n 4 --force
	$(FVPATCH) patch -p "France ->" --patch l_out-10 out/capital.safetensors --compare -n 8
	# a shipped function vector (causal mediation, present -> past) on a zero-shot prompt
	$(FVPATCH) patch -p "$$(printf 'Q: walk\nA:')" --vector present-past.fv --compare -n 3
	# a shipped fine-tuned function vector (20 antonym pairs; `maximal` is a held-out test word), then an
	# analogy solved by composing the bank of 16 such vectors
	$(FVPATCH) patch -p "$$(printf 'Q: maximal\nA:')" --vector antonym.ffv --compare -n 2
	$(FVPATCH) analogy "hot:cold::tall:?" --top 3

test: setup
	$(PY) -m pytest -q

# the suite in a random order (modules, and tests within each); pytest prints the seed, and
# `$(PY) -m pytest -q --random-order-seed=N` repeats that order
test-shuffled: setup
	$(PY) -m pytest -q --random-order

# tests on Qwen2.5-Coder 1.5B (fetched into models/ on first use, 1.1 GB); not run by CI
test-big: setup
	$(PY) -m pytest -q -m big

# stock llama.cpp programs (llama-completion, llama-server, llama-cvector-generator, ggml-rpc-server) built
# from the llama.cpp that the pinned llama-cpp-python vendors, so control vectors are checked against the
# programs users run; ~8 min on 2 cores
LLAMA_CPP_VERSION := $(shell sed -n 's/.*"llama-cpp-python==\([0-9.]*\)".*/\1/p' pyproject.toml)
LLAMA_TOOLS := .llama-tools
LLAMA_PROGRAMS := llama-completion llama-server llama-cvector-generator ggml-rpc-server
# the stamp names the pinned version, so the build reruns when the pin changes, not at any edit of pyproject.toml
llama-tools: $(LLAMA_TOOLS)/bin/.built-$(LLAMA_CPP_VERSION)

$(LLAMA_TOOLS)/bin/.built-$(LLAMA_CPP_VERSION): | setup
	rm -rf $(LLAMA_TOOLS)/src $(LLAMA_TOOLS)/bin && mkdir -p $(LLAMA_TOOLS)/src $(LLAMA_TOOLS)/bin
	$(VENV)/bin/pip download -q --no-deps --no-binary :all: -d $(LLAMA_TOOLS)/src llama-cpp-python==$(LLAMA_CPP_VERSION)
	tar -xzf $(LLAMA_TOOLS)/src/llama_cpp_python-$(LLAMA_CPP_VERSION).tar.gz -C $(LLAMA_TOOLS)/src
	cmake -S $(LLAMA_TOOLS)/src/llama_cpp_python-$(LLAMA_CPP_VERSION)/vendor/llama.cpp -B $(LLAMA_TOOLS)/build \
		-DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
		-DLLAMA_OPENSSL=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DGGML_RPC=ON
	cmake --build $(LLAMA_TOOLS)/build -j 2 --target $(LLAMA_PROGRAMS)
	cp $(addprefix $(LLAMA_TOOLS)/build/bin/,$(LLAMA_PROGRAMS)) $(LLAMA_TOOLS)/bin/
	touch $@

# control vectors between fvpatch and the stock programs (builds them first)
test-stock: llama-tools
	$(PY) -m pytest -q -m stock

# llama-cpp-python rebuilt with ggml's RPC backend, beside the venv's (not instead of it): a device whose
# buffers are not host memory, served by ggml-rpc-server on this CPU, stands in for a GPU; ~6 min.
# --no-cache-dir: pip's wheel cache does not key on CMAKE_ARGS and would return the plain CPU build
RPC_SITE := .rpc/site
$(RPC_SITE)/.built-$(LLAMA_CPP_VERSION): | setup
	rm -rf .rpc && mkdir -p .rpc
	CMAKE_ARGS="-DGGML_RPC=ON" $(VENV)/bin/pip wheel -q --no-deps --no-cache-dir --no-binary llama-cpp-python -w .rpc/whl llama-cpp-python==$(LLAMA_CPP_VERSION)
	$(VENV)/bin/pip install -q --no-deps --target $(RPC_SITE) .rpc/whl/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl
	touch $@

# save and patch with every layer offloaded to that device
test-offload: llama-tools $(RPC_SITE)/.built-$(LLAMA_CPP_VERSION)
	PYTHONPATH=$(RPC_SITE) $(PY) -m pytest -q -m offload

bench: setup
	$(PY) bench/patch_overhead.py
