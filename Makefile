# One virtual environment for everything; torch is pinned to the build this machine has on disk
# (pyproject keeps loose ranges for users elsewhere).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
TORCH_PINS = torch==2.14.1 torchvision==0.29.1
OUT ?= out/demo

.PHONY: venv demo test experiment compare clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet $(TORCH_PINS)
	$(VENV)/bin/python -m pip install --quiet -e '.[test,ray]' $(TORCH_PINS)
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(VENV)/bin/fillup-data build recipes/demo.yaml --out $(OUT)
	$(VENV)/bin/fillup-data inspect $(OUT)

test: venv
	$(VENV)/bin/python -m pytest -q

clean:
	rm -rf $(VENV) out

# The paper's Table 6 in miniature on the demo world (CE, BS, Fill-Up I, Fill-Up I+II; 3 builds x 3 seeds).
experiment: venv
	$(VENV)/bin/python -m fillup_data.demo.experiment --recipe recipes/demo_experiment.yaml \
		--train-config recipes/train/demo_experiment.yaml --seeds 0 1 2 --build-seeds 0 1 2 --out out/experiment --results results

# The paper's Table 1 in miniature on the demo world (single template, CLIP templates, Textual Inversion;
# synthetic images only; 3 seeds): results/compare.md and .json.
compare: venv
	$(VENV)/bin/python -m fillup_data.demo.compare_experiment --train-config recipes/train/compare.yaml \
		--seeds 0 1 2 --out out/compare --results results
