# Two commands for a newcomer: `make demo` and `make test`. Both create the environment first.
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1
export GRADIO_ANALYTICS_ENABLED := False

.PHONY: setup chromium demo test ui screenshots bench clean

setup: $(VENV)/.installed chromium

# torch is pinned and installed first: on these machines 2.13.0 is a local CPU wheel, an unpinned torch pulls CUDA.
# open_clip_torch is installed without its dependencies: we only read the CLIP BPE vocabulary file it ships.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,ui]'
	$(PY) -m pip install -q --no-deps open_clip_torch==3.3.0
	touch $@

demo: setup
	$(VENV)/bin/conceptkit demo --out outputs/demo

# The browser tests drive Debian's Chromium (Playwright's own browser download needs the internet).
chromium:
	@command -v chromium >/dev/null || { \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get install -y -q --no-install-recommends chromium >/dev/null \
	  || { $$SUDO apt-get update -q >/dev/null && $$SUDO apt-get install -y -q --no-install-recommends chromium >/dev/null; }; }

test: setup
	$(PY) -m pytest

ui: setup
	$(VENV)/bin/conceptkit ui

# the README's UI screenshots: the browser tests, saving into docs/images/ui (then made small: 64-colour PNGs)
screenshots: setup
	CONCEPTKIT_SCREENSHOTS=docs/images/ui $(PY) -m pytest tests/test_ui_browser.py
	$(PY) -c "import sys; from PIL import Image; [Image.open(f).convert('RGB').quantize(64).save(f, optimize=True) for f in sys.argv[1:]]" docs/images/ui/*.png

clean:
	rm -rf $(VENV) outputs
