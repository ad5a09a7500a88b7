# kdcache: make install | demo | demo-lm | test | bench | lint
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch and torchvision pinned together: these two builds work with each other (see README)
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: install demo demo-lm test bench lint clean

install: $(VENV)/.installed

# reinstalled only when the project's dependencies change
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check $(TORCH)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

demo: install
	rm -rf runs/digits
	$(BIN)/kdcache run pipelines/digits.yaml

demo-lm: install
	rm -rf runs/pydoc-lm
	$(BIN)/kdcache run pipelines/pydoc-lm.yaml

test: install
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python bench/run.py

lint: install
	$(BIN)/python -m pyflakes kdcache tests bench
	$(BIN)/lint-imports

clean:
	rm -rf runs $(VENV)
