# Two commands set up a fresh machine: `make demo` runs the main job, `make test` passes the tests.
VENV ?= .venv
PY := $(VENV)/bin/python
FVPATCH := $(VENV)/bin/fvpatch

.PHONY: setup demo test test-shuffled test-big bench
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

bench: setup
	$(PY) bench/patch_overhead.py
