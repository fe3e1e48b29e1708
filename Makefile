# The README's two commands: `make demo` and `make test`. Both install into .venv/ first if needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export DS_ACCELERATOR ?= cpu
export OMP_NUM_THREADS ?= 1
export TOKENIZERS_PARALLELISM ?= false
export PYTHONUNBUFFERED := 1

.PHONY: install demo test lint clean-demo

install: $(STAMP)

# One pip call for the runtime, test/lint and MPI requirements (setup.py's install_requires and its [dev] and [mpi]
# extras): torch is pinned in the same call as deepspeed (requirements.txt), so pip never pulls a CUDA build.
# The last step builds DeepSpeed's CPU shared-memory comm op once, so no run pays its ~30 s JIT later (after
# clearing a build lock left by a killed build, on which torch would otherwise wait forever).
REQUIREMENTS := requirements.txt requirements-dev.txt requirements-mpi.txt
$(STAMP): $(REQUIREMENTS) setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(addprefix -r ,$(REQUIREMENTS))
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	$(PY) -c "from dskd_scale.engine.distributed import build_cpu_shm_op; build_cpu_shm_op()"
	touch $(STAMP)

demo: install
	$(PY) tools/demo.py --out demo_out

test: install
	$(PY) -m pytest -q tests

lint: install
	$(VENV)/bin/ruff check .
