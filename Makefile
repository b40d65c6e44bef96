# Two set-up commands for a fresh machine (each installs what it needs):
#   make demo   -> fine-tune a tiny InternVL2 on the bundled sample, on the CPU, end to end
#   make test   -> the whole test suite (what CI runs)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install install-dev demo test lint mutants clean java chromium

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch first: on the dev/CI machines `torch==2.13.0` is the CPU wheel on disk; a GPU box keeps its own torch.
$(STAMP)-core: pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e ".[eval]"
	touch $@

$(STAMP)-dev: pyproject.toml $(STAMP)-core
	$(BIN)/pip install -e ".[dev]"
	touch $@

install: $(STAMP)-core java
install-dev: $(STAMP)-dev java chromium

# Caption metrics (METEOR, PTB tokenizer) run on Java.
java:
	@command -v java >/dev/null 2>&1 || { \
	  echo "java not found: installing default-jre-headless"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && $$SUDO apt-get install -y -q default-jre-headless; }

# The report test renders report.html in a real headless browser (tests/report/test_browser.py).
chromium:
	@command -v /usr/bin/chromium >/dev/null 2>&1 || { \
	  echo "chromium not found: installing chromium and chromium-driver"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && $$SUDO apt-get install -y -q chromium chromium-driver; }

demo: install
	$(BIN)/internvl-tune demo

test: install-dev
	$(BIN)/python -m pytest -n 2 --durations=15

lint: install-dev
	$(BIN)/ruff check src tests

# Plant known bugs one at a time in a scratch copy and check that the tests catch each (tools/mutants.py).
mutants: install-dev
	$(BIN)/python tools/mutants.py

clean:
	rm -rf runs .pytest_cache .hypothesis
