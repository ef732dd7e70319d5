# Two commands on a fresh Linux machine:  `make demo`  and  `make test`.
# Both create ./.venv and install what is missing; nothing outside the repo is touched.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
# torch: the CPU build on CPU boxes; `make TORCH=torch` takes PyPI's default (CUDA) build.
TORCH  ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: setup demo test bench clean
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	@touch $@

demo: setup
	$(PY) app.py --input realtime/data/carphone_pristine.mp4 --output_folder video_output

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

bench: setup
	$(PY) bench/bench_all.py

clean:
	rm -rf $(VENV) video_output image_output .pytest_cache
