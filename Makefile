# The two commands of the README's quick start. Each makes .venv if missing.
PY := .venv/bin/python
# On this project's CPU machines torch 2.13.0 is a CPU build on local disk; elsewhere pick yours,
# e.g. make TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" test
TORCH ?= torch==2.13.0
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test install gpu-kit

.venv/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	# torch first: on a CPU machine this takes the CPU build, not a multi-GB CUDA one.
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: .venv/.installed

## Train the embedded demo (tiny random Llama, synthetic PubMedQA), offline on a CPU.
demo: install
	$(PY) -m medqa fit --config configs/demo.yaml

## Run the test suite on the CPU.
test: install
	$(PY) -m pytest -q

## Build the Unsloth / bitsandbytes kit for the lent GPU machine (developers only).
gpu-kit:
	bash ../shared/gpu/make-kit.sh
