# sdlearn: `make lab` to learn, `make test` to check everything, `make notebooks` to re-run lessons.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.sdlearn-installed

.PHONY: lab test test-fast notebooks bench clean-venv train-clip train-tiny-vae train-classifier train-ddpm train-mini-sd train-lora-star train-ti-sun train-ti-star train-hypernetwork-star train-dreambooth-star train-dit-shapes train-dit-flow

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

# One worker per CPU core; a file (or a notebook) stays on one worker (conftest.py explains the threads).
test: $(STAMP)
	$(VENV)/bin/pytest -n auto --dist loadfile

test-fast: $(STAMP)
	$(VENV)/bin/pytest tests -m "not slow"

notebooks: $(STAMP)
	$(PY) tools/execute_notebooks.py $(if $(NB),$(NB),notebooks/*.ipynb)

# Reproduce the shipped artefacts in data/ (data/README.md lists times and quality).
# Each target takes overrides on the command line, defaults being the shipped run's:
#   OUT      the folder to write (default: the shipped one in data/; OVERWRITE=1 replaces it)
#   STEPS    training steps
#   SAMPLES  evaluation samples (train-ddpm, train-mini-sd, train-dit-*; HELDOUT: held-out prompts of train-mini-sd)
#   ARGS     more options for the recipe, EVAL_ARGS for the evaluation that follows it
# e.g. `make train-ddpm OUT=/tmp/ddpm STEPS=20 SAMPLES=4`. INSTALL= skips the virtual
# environment's install step (with PY=some/python, as tests/test_commands.py runs every target).
INSTALL = $(STAMP)
ARGS =
EVAL_ARGS =

train-clip: OUT = data/clip-shapes
train-clip: STEPS = 3000
train-clip: $(INSTALL)
	$(PY) -m sdlearn.recipes.clip train-tiny $(OUT) --steps $(STEPS) --batch-size 128 $(ARGS) $(if $(OVERWRITE),--overwrite)

train-tiny-vae: OUT = data/tiny-vae
train-tiny-vae: STEPS = 3000
train-tiny-vae: $(INSTALL)
	$(PY) -m sdlearn.recipes.tiny_vae --out $(OUT) --steps $(STEPS) --threads 1 $(ARGS) $(if $(OVERWRITE),--overwrite)

train-classifier: OUT = data/shapes-classifier
train-classifier: STEPS = 3000
train-classifier: SAMPLES = 500
train-classifier: $(INSTALL)
	$(PY) -m sdlearn.recipes.classifier --out $(OUT) --steps $(STEPS) --threads 1 $(ARGS) $(if $(OVERWRITE),--overwrite)
	$(PY) -m sdlearn.evaluate classifier --classifier $(OUT) --n $(SAMPLES) --json $(OUT)/evaluation.json $(EVAL_ARGS)

# --precision auto: bf16 mixed precision on CPUs with native bf16 (1.5x faster there), fp32 on others (where bf16 measured 14x slower).
train-ddpm: OUT = data/ddpm-shapes
train-ddpm: STEPS = 4300
train-ddpm: SAMPLES = 200
train-ddpm: $(INSTALL)
	$(PY) -m sdlearn.recipes.ddpm --out $(OUT) --steps $(STEPS) --precision auto $(ARGS) $(if $(OVERWRITE),--overwrite)
	$(PY) -m sdlearn.evaluate ddpm --model $(OUT) --samples $(SAMPLES) $(EVAL_ARGS) --json $(OUT)/evaluation.json

train-mini-sd: OUT = data/mini-sd
train-mini-sd: STEPS = 4600
train-mini-sd: SAMPLES = 200
train-mini-sd: HELDOUT = 100
train-mini-sd: TEXT_ENCODER = data/clip-shapes
train-mini-sd: $(INSTALL)
	$(PY) -m sdlearn.recipes.mini_sd --out $(OUT) --text-encoder $(TEXT_ENCODER) --steps $(STEPS) $(ARGS) $(if $(OVERWRITE),--overwrite)
	$(PY) -m sdlearn.evaluate text-to-image --model $(OUT) --samplers ddim euler dpmpp_2m --n $(SAMPLES) --heldout $(HELDOUT) $(EVAL_ARGS) --json $(OUT)/evaluation.json

# The record README.md quotes (data/bench/unet-cpu.json); BENCH_ARGS="--repeats 5" for a quick look.
BENCH_JSON = data/bench/unet-cpu.json
BENCH_ARGS = --repeats 31 --count-ops
bench: $(INSTALL)
	$(PY) -m sdlearn.bench unet $(BENCH_ARGS) --json $(BENCH_JSON)

clean-venv:
	rm -rf $(VENV)

# Lesson 12: teaching mini-SD the star (and textual inversion a word for a large yellow circle).
# Each run is evaluated by `python -m sdlearn.evaluate concept` (EVAL_ARGS: --n, --small, --original).
PERSONALISE = $(PY) -m sdlearn.recipes.personalise
CONCEPT_EVAL = $(PY) -m sdlearn.evaluate --threads 1 concept

train-lora-star: OUT = data/lora-star
train-lora-star: STEPS = 1500
train-lora-star: $(INSTALL)
	$(PERSONALISE) --method lora --concept star --out $(OUT) --steps $(STEPS) --threads 1 $(ARGS) $(if $(OVERWRITE),--overwrite)
	$(CONCEPT_EVAL) --adapter $(OUT) $(EVAL_ARGS) --json $(OUT)/evaluation.json

train-ti-sun: OUT = data/ti-sun
train-ti-sun: STEPS = 800
train-ti-sun: $(INSTALL)
	$(PERSONALISE) --method textual-inversion --concept sun --out $(OUT) --steps $(STEPS) --threads 1 $(ARGS) $(if $(OVERWRITE),--overwrite)
	$(CONCEPT_EVAL) --adapter $(OUT) $(EVAL_ARGS) --json $(OUT)/evaluation.json

train-ti-star: OUT = data/ti-star
train-ti-star: STEPS = 800
train-ti-star: $(INSTALL)
	$(PERSONALISE) --method textual-inversion --concept star --out $(OUT) --steps $(STEPS) --threads 1 $(ARGS) $(if $(OVERWRITE),--overwrite)
	$(CONCEPT_EVAL) --adapter $(OUT) $(EVAL_ARGS) --json $(OUT)/evaluation.json

train-hypernetwork-star: OUT = data/hypernetwork-star
train-hypernetwork-star: STEPS = 800
train-hypernetwork-star: $(INSTALL)
	$(PERSONALISE) --method hypernetwork --concept star --out $(OUT) --steps $(STEPS) --threads 1 $(ARGS) $(if $(OVERWRITE),--overwrite)
	$(CONCEPT_EVAL) --adapter $(OUT) $(EVAL_ARGS) --json $(OUT)/evaluation.json

# DreamBooth twice, with and without prior preservation; the fine-tuned UNets (17 MB each) are not shipped, their records are.
train-dreambooth-star: OUT = data/dreambooth-star
train-dreambooth-star: STEPS = 400
train-dreambooth-star: $(INSTALL)
	$(PERSONALISE) --method dreambooth --concept star --prior-weight 1 --out $(OUT)/with-prior --steps $(STEPS) --threads 1 $(ARGS) $(if $(OVERWRITE),--overwrite)
	$(CONCEPT_EVAL) --adapter $(OUT)/with-prior $(EVAL_ARGS) --json $(OUT)/with-prior/evaluation.json
	$(PERSONALISE) --method dreambooth --concept star --prior-weight 0 --out $(OUT)/without-prior --steps $(STEPS) --threads 1 $(ARGS) $(if $(OVERWRITE),--overwrite)
	$(CONCEPT_EVAL) --adapter $(OUT)/without-prior $(EVAL_ARGS) --json $(OUT)/without-prior/evaluation.json

# Lesson 14: a class-conditional DiT on the tiny VAE's latents (32 classes, "red circle" ...), a DiTPipeline folder,
# trained twice: DDPM's eps objective (DDIM) and flow matching (flow_euler); the evaluations compare them per step count.
DIT = $(PY) -m sdlearn.recipes.dit
DIT_EVAL = $(PY) -m sdlearn.evaluate --threads 1 dit

train-dit-shapes: OUT = data/dit-shapes
train-dit-shapes: STEPS = 4000
train-dit-shapes: SAMPLES = 200
train-dit-shapes: $(INSTALL)
	$(DIT) --out $(OUT) --objective eps --steps $(STEPS) --threads 1 $(ARGS) $(if $(OVERWRITE),--overwrite)
	$(DIT_EVAL) --model $(OUT) --n $(SAMPLES) $(EVAL_ARGS) --json $(OUT)/evaluation.json

train-dit-flow: OUT = data/dit-flow-shapes
train-dit-flow: STEPS = 4000
train-dit-flow: SAMPLES = 200
train-dit-flow: $(INSTALL)
	$(DIT) --out $(OUT) --objective flow --steps $(STEPS) --threads 1 $(ARGS) $(if $(OVERWRITE),--overwrite)
	$(DIT_EVAL) --model $(OUT) --n $(SAMPLES) $(EVAL_ARGS) --json $(OUT)/evaluation.json
