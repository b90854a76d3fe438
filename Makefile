# Quickstart: `make demo` and `make test` on a fresh machine. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# constraints.txt: the exact versions CI tests (a new release of a reference library such as transformers must not
# change CI's answer unannounced). pyproject.toml keeps the open ranges users install with; `make lock` refreshes it.
PIP_INSTALL := $(PIP) install -q -c constraints.txt
# The CPU build of torch lies on this machine's disk; installing it before the `hf` extra keeps CI fast.
TORCH_CPU ?= torch==2.13.0
PYTEST_ARGS ?= -n 2

.PHONY: demo test notebooks bench lint lock clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.installed: $(PY) pyproject.toml constraints.txt
	$(PIP_INSTALL) -e .
	touch $@

# tpu: libtpu (~200 MB), so the tests compile the kernels for real TPUs ahead of time on this host;
# eval: lm-evaluation-harness, whose transformers backend the adapter is compared with
$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP_INSTALL) $(TORCH_CPU)
	$(PIP_INSTALL) -e ".[dev,hf,tpu,eval]"
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/nemojax train --config tiny
	$(VENV)/bin/nemojax generate --model checkpoints/tiny/model --prompt "def " --max-new-tokens 200 \
		--temperature 0.8 --top-k 40 --ignore-eos

test: $(VENV)/.installed-dev
	$(PY) -m pytest $(PYTEST_ARGS) tests

# every notebook in colab/, top to bottom twice, at CI size (also part of `make test`)
notebooks: $(VENV)/.installed-dev
	$(PY) -m pytest tests/test_notebooks.py

bench: $(VENV)/.installed-dev
	$(PY) benchmarks/forward_vs_hf.py
	$(PY) benchmarks/moe.py
	$(PY) benchmarks/decode.py
	$(PY) benchmarks/train_step.py

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check nemojax pallas_kernels tests benchmarks

# after upgrading packages in .venv deliberately (and `make test` passing): pin what is installed now
lock: $(VENV)/.installed-dev
	{ sed -n '1,/^$$/p' constraints.txt; $(PIP) freeze --exclude-editable | sed 's/+cpu$$//'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

clean:
	rm -rf $(VENV) .pytest_cache checkpoints
