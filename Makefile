# Two commands for a newcomer: `make demo` and `make test`. Both create the environment first.
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1
export GRADIO_ANALYTICS_ENABLED := False

.PHONY: setup lock upgrade-check chromium demo test ui screenshots bench clean

setup: $(VENV)/.installed chromium

# The environment is the lock, exactly: every package pinned with its hashes (requirements/lock.txt, made by
# `make lock` from pyproject.toml's ranges). torch is the machine's local CPU wheel 2.13.0+cpu (pip finds it through
# its find-links; an unpinned torch pulls CUDA). open_clip_torch is installed without its dependencies: we only read
# the CLIP BPE vocabulary file it ships. conceptkit itself goes in last, editable, with nothing more resolved.
$(VENV)/.installed: requirements/lock.txt requirements/no-deps.txt pyproject.toml
	rm -rf $(VENV)
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --require-hashes --only-binary :all: -r requirements/lock.txt
	$(PY) -m pip check
	$(PY) -m pip install -q --require-hashes --only-binary :all: --no-deps -r requirements/no-deps.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

# Refresh the lock from pyproject.toml's ranges (after changing them; then run `make test`). uv is pinned too.
lock:
	python3 -m venv /tmp/conceptkit-uv && /tmp/conceptkit-uv/bin/pip install -q uv==0.13.9
	/tmp/conceptkit-uv/bin/uv pip compile pyproject.toml requirements/build.in --extra test --extra ui \
	  --generate-hashes --find-links /opt/wheels --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
	  --custom-compile-command "make lock" -o requirements/lock.txt
	/tmp/conceptkit-uv/bin/uv pip compile requirements/no-deps.in --no-deps --generate-hashes --python-version 3.11 \
	  --python-platform x86_64-manylinux_2_28 --custom-compile-command "make lock" -o requirements/no-deps.txt

# Not part of CI: the newest releases of our dependencies (pyproject's upper bounds lifted, torch kept) in a
# throw-away environment; prints what changed against the lock and what broke in the fast tests.
upgrade-check:
	python3 tools/upgrade_check.py

demo: setup
	$(VENV)/bin/conceptkit demo --out outputs/demo

# The browser tests drive Debian's Chromium (Playwright's own browser download needs the internet).
chromium:
	@command -v chromium >/dev/null || { \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get install -y -q --no-install-recommends chromium >/dev/null \
	  || { $$SUDO apt-get update -q >/dev/null && $$SUDO apt-get install -y -q --no-install-recommends chromium >/dev/null; }; }

# The suite runs in one process per core (pytest-xdist; each test keeps to one torch thread, conftest.py), a test
# file per process at a time so that its module fixtures are built once. TEST_WORKERS=0 runs it in this process.
TEST_WORKERS ?= auto
test: setup
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile

ui: setup
	$(VENV)/bin/conceptkit ui

# the README's UI screenshots: the browser tests, saving into docs/images/ui (then made small: 64-colour PNGs)
screenshots: setup
	CONCEPTKIT_SCREENSHOTS=docs/images/ui $(PY) -m pytest tests/test_ui_browser.py
	$(PY) -c "import sys; from PIL import Image; [Image.open(f).convert('RGB').quantize(64).save(f, optimize=True) for f in sys.argv[1:]]" docs/images/ui/*.png

clean:
	rm -rf $(VENV) outputs
