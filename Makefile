# sdlearn: `make lab` to learn, `make test` to check everything, `make notebooks` to re-run lessons.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.sdlearn-installed

.PHONY: lab test test-fast notebooks bench clean-venv train-clip train-tiny-vae train-classifier train-ddpm train-mini-sd

# Create the virtual environment once, and reinstall whenever the pins change.
$(STAMP): requirements.txt pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "sdlearn needs Python 3.11 or newer; run: make PYTHON=python3.11 ..."'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -r requirements.txt
	$(PY) -m pip install --disable-pip-version-check -q --no-deps --no-build-isolation -e .
	$(PY) -m ipykernel install --sys-prefix --name sdlearn --display-name "sdlearn (Python 3)" >/dev/null
	@touch $(STAMP)

# LAB_ARGS passes options to JupyterLab, e.g. `make lab LAB_ARGS="--no-browser --port 8899"`.
# Jupyter refuses to run as root (containers, cloud VMs) unless told that it is intended.
LAB_ARGS ?=
# The learner's copies go to lab/ (exercises blank; never overwritten once there); notebooks/ keeps the worked lessons.
lab: $(STAMP)
	$(PY) tools/learner_notebooks.py --out lab notebooks/*.ipynb
	$(VENV)/bin/jupyter lab $(if $(filter 0,$(shell id -u)),--allow-root) $(LAB_ARGS) lab/00_welcome.ipynb

test: $(STAMP)
	$(VENV)/bin/pytest

test-fast: $(STAMP)
	$(VENV)/bin/pytest tests -m "not slow"

notebooks: $(STAMP)
	$(PY) tools/execute_notebooks.py $(if $(NB),$(NB),notebooks/*.ipynb)

# Reproduce the shipped artefacts in data/ (data/README.md lists times and quality).
train-clip: $(STAMP)
	$(PY) -m sdlearn.recipes.clip train-tiny data/clip-shapes --steps 3000 --batch-size 128 $(if $(OVERWRITE),--overwrite)

train-tiny-vae: $(STAMP)
	$(PY) -m sdlearn.recipes.tiny_vae --out data/tiny-vae --threads 1 $(if $(OVERWRITE),--overwrite)

# --precision auto: bf16 mixed precision on CPUs with native bf16 (1.5x faster there), fp32 on others (where bf16 measured 14x slower).
train-ddpm: $(STAMP)
	$(PY) -m sdlearn.recipes.ddpm --out data/ddpm-shapes --precision auto $(if $(OVERWRITE),--overwrite)
	$(PY) -m sdlearn.evaluate ddpm --samples 200 --json data/ddpm-shapes/evaluation.json

train-mini-sd: $(STAMP)
	$(PY) -m sdlearn.recipes.mini_sd --out data/mini-sd --text-encoder data/clip-shapes --steps 4600 $(if $(OVERWRITE),--overwrite)
	$(PY) -m sdlearn.evaluate text-to-image --samplers ddim euler dpmpp_2m --json data/mini-sd/evaluation.json

train-classifier: $(STAMP)
	$(PY) -m sdlearn.recipes.classifier --out data/shapes-classifier --threads 1 $(if $(OVERWRITE),--overwrite)

bench: $(STAMP)
	$(PY) -m sdlearn.bench unet

clean-venv:
	rm -rf $(VENV)
