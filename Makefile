# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# torch first, pinned: it comes from local disk; a plain PyPI torchvision beside another torch breaks timm.
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: install demo test test-all fuzz gpu-check gpu-check-prepare gpu-check-dry bench clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

# Compress the real pretrained MiniLM (50% of its MLP weights pruned, distilled), evaluate, show the report.
demo: install
	$(VENV)/bin/compress run ref:minilm --recipe magnitude-50 --set 1.steps=50 --out out/minilm-magnitude-50 --force
	$(VENV)/bin/compress inspect out/minilm-magnitude-50 --top 8
	cat out/minilm-magnitude-50/report.md

test: install
	$(PY) -m pytest -q

test-all: install
	$(PY) -m pytest -q -m ''

# Long fuzzing of the readers (safetensors, codecs, recipes): FUZZ_EXAMPLES fresh random inputs per target.
FUZZ_EXAMPLES ?= 20000
fuzz: install
	FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest -q -p no:cacheprovider tests/test_fuzz.py

# The GPU check (README, "The GPU check"): with the machine's own python3 and torch, nothing installed;
# `make gpu-check-prepare` writes the models it reads (.gpu-check/), `make gpu-check-dry` runs it on the CPU.
gpu-check:
	python3 benchmarks/gpu_check.py --out benchmarks/results/gpu

gpu-check-prepare: install
	$(PY) benchmarks/gpu_check.py --prepare

gpu-check-dry: gpu-check-prepare
	$(PY) benchmarks/gpu_check.py --dry-run --out out/gpu-check-dry

bench: install
	$(PY) benchmarks/magnitude_recovery.py

clean:
	rm -rf out .pytest_cache
