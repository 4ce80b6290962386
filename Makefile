# Two commands for a newcomer: `make demo` and `make test`. Both create the environment first.
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: setup demo test bench clean

setup: $(VENV)/.installed

# torch is pinned and installed first: on these machines 2.13.0 is a local CPU wheel, an unpinned torch pulls CUDA.
# open_clip_torch is installed without its dependencies: we only read the CLIP BPE vocabulary file it ships.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps open_clip_torch==3.3.0
	touch $@

demo: setup
	$(VENV)/bin/conceptkit generate --prompt-file examples/demo_prompts.txt --seed 0 --num-images 4 --out outputs/demo

test: setup
	$(PY) -m pytest

clean:
	rm -rf $(VENV) outputs
