# projkd pipeline: teachers (fetched and verified, or trained) -> distillation for each pair, method
# and seed -> tables, all files. Every knob is in params.mk and can be overridden on the command
# line (make cifar-all EPOCHS=2 SEEDS=1). `make help` lists the targets; `make -n cifar-all` prints
# the whole plan, each command in full.
#
#   $(TEACHERS)/<arch>.pt      teacher checkpoint; one that exists is used as is
#   $(TEACHERS)/<arch>.json    where it came from (fetched and verified, or trained here)
#   $(TEACHERS)/<arch>.tcache  its outputs on every training view, for pefd/kd/crd on a GPU
#   $(RUNS)/<arch>/ce-seed<N>/ a model trained alone: a teacher, or the Student row
#   $(RUNS)/<teacher>-<student>/<method>-seed<N>/
#                              a distillation run (pefd-q2-seed1: an ablation variant)
#   $(TEACHERS)/<arch>.eval.json, <run>/model.eval.json
#                              each model file evaluated alone (projkd.py eval): the tables' numbers
#   $(RESULTS)/<dataset>.md, .csv, ablations.md
#                              the tables
#   $(RESULTS)/figures/*.png   their figures, linked from the .md (docs/protocol.md)
# ImageNet (imagenet-all, the paper's Table 1) has the same layout under runs/imagenet/ and
# results/imagenet.md, made by a make of its own with DATASET=imagenet; its teachers,
# checkpoints/imagenet/<arch>.pt, are torchvision's pretrained weights, fetched, never trained.
# A run is finished when its metrics.json exists. Every run is started with --resume, so an
# interrupted make continues interrupted runs from their last.pt and redoes nothing that finished.
include params.mk

ON_IMAGENET := $(filter imagenet,$(DATASET))
# Full-length runs (240 epochs, ImageNet's 100) live where projkd.py puts them by default; other
# lengths get folders of their own. ImageNet's teachers are pretrained weights, the same whatever
# the students' EPOCHS.
FULL_EPOCHS := $(if $(ON_IMAGENET),100,240)
TAG := $(DATASET)$(if $(filter $(FULL_EPOCHS),$(EPOCHS)),,-e$(EPOCHS))
RUNS := runs/$(TAG)
TEACHERS := checkpoints/$(if $(ON_IMAGENET),imagenet,$(TAG))
RESULTS := results$(if $(filter cifar100 imagenet,$(TAG)),,/$(TAG))
# The python: PY from params.mk or the command line. The default, .venv/bin/python, is made here
# (python3 -m venv) the first time a target needs it, so `make test` and `make cifar-all` are the
# whole set-up.
VENV_PY := .venv/bin/python
# The stamp of `pip install -r requirements.txt -r requirements-dev.txt` into $(PY), made again when
# a requirements file changes: .venv/.deps-installed for the venv (it goes when .venv does); else
# one per interpreter, named by its sys.executable (.deps-installed.d/usr/bin/python3). A `touch
# .deps-installed` instead means: use each PY as it is and install nothing (a GPU machine's own
# torch).
ifeq ($(origin DEPS)$(wildcard .deps-installed),undefined)
ifeq ($(PY),$(VENV_PY))
DEPS := .venv/.deps-installed
else
PY_EXECUTABLE := $(shell $(PY) -c 'import sys; print(sys.executable)' 2>/dev/null || echo /$(PY))
DEPS := .deps-installed.d$(PY_EXECUTABLE)
endif
else
DEPS ?= .deps-installed
endif
INSTALL = $(PY) -m pip install -r requirements.txt -r requirements-dev.txt
# The data every cifar100 (or imagenet) run needs.
CIFAR100_DATA := $(if $(filter cifar100,$(DATASET)),$(DATA_DIR)/cifar-100-python/test)
IMAGENET_DATA := $(if $(ON_IMAGENET),$(DATA_DIR)/val)
DATA := $(CIFAR100_DATA)$(IMAGENET_DATA)
# A training: LAUNCH in front (empty, or srun on a cluster), and on ImageNet torchrun with NPROC
# processes, one per GPU, through torchrun_signals.py, which passes SIGUSR1 and SIGTERM on to every
# worker (docs/many-gpus.md).
TORCHRUN := $(if $(ON_IMAGENET), torchrun_signals.py --standalone --nproc_per_node=$(NPROC))
# The data and the device of every command that reads data.
DATA_DEVICE_FLAGS = --dataset $(DATASET) --data-dir $(DATA_DIR) --device $(DEVICE)
RUN := $(LAUNCH) $(PY)$(TORCHRUN) projkd.py $(DATA_DEVICE_FLAGS) --epochs $(EPOCHS)
# Whether DEVICE=auto finds a GPU: under a LAUNCH (which asks for GPUs), or where nvidia-smi lists
# one. Both are recursive (=): nvidia-smi runs only where GPU_VISIBLE is expanded.
NVIDIA_SMI_GPU = $(shell nvidia-smi -L 2>/dev/null | grep -q '^GPU' && echo yes)
GPU_VISIBLE = $(if $(strip $(LAUNCH)),yes,$(NVIDIA_SMI_GPU))
# The teacher-output cache: one file per teacher checkpoint, built once, read by its pefd, kd and
# crd runs on CIFAR-style data (their --teacher-cache on). With TEACHER_CACHE=auto only on a GPU:
# not for DEVICE=cpu, and for DEVICE=auto only under a LAUNCH (which asks for GPUs) or where
# nvidia-smi lists one (building it on a CPU takes hours; it still pays for itself over a whole
# pipeline: TEACHER_CACHE=on); never with off, nor on ImageNet.
USE_CACHE :=
ifeq ($(ON_IMAGENET),)
ifeq ($(TEACHER_CACHE),on)
USE_CACHE := yes
else ifeq ($(TEACHER_CACHE)-$(DEVICE),auto-auto)
USE_CACHE := $(GPU_VISIBLE)
else ifeq ($(TEACHER_CACHE),auto)
USE_CACHE := $(if $(filter cpu,$(DEVICE)),,yes)
endif
endif
TABLE_KIND := $(if $(ON_IMAGENET),imagenet,main)
# The teachers fetch-teachers installs from TEACHERS_URL on CIFAR-100 (fetch.PUBLISHED_TEACHERS);
# every other teacher is trained. Short trials (EPOCHS other than 240) fetch them too, into their
# own $(TEACHERS): they are the paper's teachers whatever the students' EPOCHS, and never depended
# on it.
ARCHIVE_TEACHERS := wrn_40_2 vgg13 resnet32x4 ResNet50 resnet56 resnet110
ifeq ($(DATASET)-$(TEACHERS_FROM),cifar100-fetch)
FETCHED := $(ARCHIVE_TEACHERS)
else
FETCHED :=
endif
# Under make cifar-all (or ablations) the fetched teachers of its pairs come before every run
# (order-only prerequisites): offline, make stops on the first one missing before any training
# starts.
FIRST_TEACHERS = $(if $(filter cifar-all dataset-all,$(MAKECMDGOALS)),$(TEACHER_ARCHS)) \
  $(if $(filter ablations,$(MAKECMDGOALS)),$(foreach p,$(ABLATION_PAIRS),$(call teacher_of,$p)))
FETCHED_FIRST = $(foreach a,$(sort $(filter $(FETCHED),$(FIRST_TEACHERS))),$(TEACHERS)/$a.pt)
# ImageNet runs every rule of this file in a make of its own: these knobs replace the CIFAR ones
# there.
IMAGENET_KNOBS = DATASET=imagenet DATA_DIR=$(IMAGENET_DIR) EPOCHS=$(IMAGENET_EPOCHS) \
  PAIRS="$(IMAGENET_PAIRS)" METHODS="$(IMAGENET_METHODS)" SEEDS="$(IMAGENET_SEEDS)"

.DELETE_ON_ERROR:
# Teacher checkpoints, their caches and runs can be intermediates of the tables: Make must never
# delete them. (Not a blanket .SECONDARY:, under which a deleted run would not be redone while the
# tables are up to date.)
.PRECIOUS: $(TEACHERS)/%.pt $(TEACHERS)/%.tcache $(TEACHERS)/%.eval.json \
  $(RUNS)/%/metrics.json $(RUNS)/%/model.eval.json
.SECONDEXPANSION:
.PHONY: help cifar-all dataset-all plan-cost download fetch-teachers imagenet-all imagenet-r34-r18 \
  imagenet-r50-mobilenet teachers pair ablations tables bench smoke docs test clean

# --- names: what a path says about its run --------------------------------------------------------
teacher_of = $(word 1,$(subst :, ,$1))
student_of = $(word 2,$(subst :, ,$1))
pair_dir = $(call teacher_of,$1)-$(call student_of,$1)
# A run's stem (its path under $(RUNS)) is <teacher>-<student>/<method>[-<variant>...]-seed<N> or
# <arch>/ce-seed<N>.
stem_pair = $(firstword $(subst /, ,$1))
stem_words = $(subst -, ,$(lastword $(subst /, ,$1)))
# A pair's folder is <teacher>-<student>; a model trained alone has <arch> only, and no teacher.
pair_words = $(subst -, ,$(call stem_pair,$1))
stem_teacher = $(if $(findstring -,$(call stem_pair,$1)),$(firstword $(call pair_words,$1)))
stem_student = $(lastword $(call pair_words,$1))
stem_method = $(firstword $(call stem_words,$1))
stem_seed = $(patsubst seed%,%,$(lastword $(call stem_words,$1)))
stem_variant = $(filter-out $(call stem_method,$1) seed%,$(call stem_words,$1))
# Variant words as projkd.py names them (run_name): qN, depthN, or an activation.
variant_flag = $(if $(filter q%,$1),--q $(1:q%=%),$(call depth_or_act_flag,$1))
depth_or_act_flag = $(if $(filter depth%,$1),--proj-depth $(1:depth%=%),--proj-act $1)
variant_flags = $(foreach v,$1,$(call variant_flag,$v))
# The teacher-output cache file a run reads, if any.
reads_cache = $(and $(USE_CACHE),$(filter pefd kd crd,$(call stem_method,$1)))
stem_cache = $(if $(call reads_cache,$1),$(TEACHERS)/$(call stem_teacher,$1).tcache)
# A run's own flags, from its stem: its teacher and the teacher's cache (if any), its student,
# method, projector variant and seed.
stem_teacher_ckpt = $(TEACHERS)/$(call stem_teacher,$1).pt
teacher_flags = $(if $(call stem_teacher,$1),--teacher $(call stem_teacher,$1) \
  --teacher-ckpt $(call stem_teacher_ckpt,$1))
cache_flags = $(if $(call stem_cache,$1),--teacher-cache on \
  --teacher-cache-file $(call stem_cache,$1))
student_flags = --student $(call stem_student,$1) --method $(call stem_method,$1) \
  $(call variant_flags,$(call stem_variant,$1)) --seed $(call stem_seed,$1)
run_flags = $(call teacher_flags,$1) $(call cache_flags,$1) $(call student_flags,$1)

# --- what each target needs -----------------------------------------------------------------------
TEACHER_ARCHS = $(sort $(foreach p,$(PAIRS),$(call teacher_of,$p)))
STUDENT_ARCHS = $(sort $(foreach p,$(PAIRS),$(call student_of,$p)))
# seeded_runs folder,name: the metrics.json of run <name>-seed<N> in $(RUNS)/<folder>/, each seed.
seeded_runs = $(foreach s,$(SEEDS),$(RUNS)/$1/$2-seed$s/metrics.json)
# The Student row: one ce run per student architecture and seed, shared by the pairs with that
# student.
student_runs = $(if $(filter ce,$(METHODS)),$(foreach a,$1,$(call seeded_runs,$a,ce)))
DISTILL_METHODS = $(filter-out ce,$(METHODS))
# named_runs pair,names: the runs of one pair, each name with each seed.
named_runs = $(foreach n,$2,$(call seeded_runs,$(call pair_dir,$1),$n))
pair_runs = $(foreach p,$1,$(call named_runs,$p,$(DISTILL_METHODS)))
ABLATION_RUN_NAMES = pefd $(addprefix pefd-,$(ABLATION_VARIANTS))
ablation_runs = $(foreach p,$1,$(call named_runs,$p,$(ABLATION_RUN_NAMES)))
MAIN_RUNS = $(call student_runs,$(STUDENT_ARCHS)) $(call pair_runs,$(PAIRS))
# The evaluation step: every finished run's model.pt and every teacher checkpoint, evaluated alone.
evals_of = $(patsubst %/metrics.json,%/model.eval.json,$1)
teacher_evals = $(foreach a,$1,$(TEACHERS)/$a.eval.json)
MAIN_EVALS = $(call evals_of,$(MAIN_RUNS)) $(call teacher_evals,$(TEACHER_ARCHS))
ABLATION_RUNS = $(call ablation_runs,$(ABLATION_PAIRS))
ABLATION_EVALS = $(call evals_of,$(ABLATION_RUNS))
TABLES = $(RESULTS)/$(DATASET).md $(RESULTS)/$(DATASET).csv
# The cost before the work: on CIFAR-100, where runs are still to do, plan_cost.py says first what
# they would take on this machine's CPU (nothing on a GPU).
RUNS_TO_DO = $(filter-out $(wildcard $(MAIN_RUNS)),$(MAIN_RUNS))
PLAN_COST = $(if $(filter cifar100,$(DATASET)),$(if $(RUNS_TO_DO),plan-cost))
# Under -j too, cifar-all's fetches and runs wait for the estimate (other goals have none)
COST_FIRST = $(if $(filter cifar-all dataset-all,$(MAKECMDGOALS)),$(PLAN_COST))
MAIN_TABLE_FLAGS = --kind $(TABLE_KIND) --runs $(RUNS) --teachers $(TEACHERS) \
  --pairs "$(PAIRS)" --methods "$(METHODS)" --seeds "$(SEEDS)"
FIGURES = --figures $(RESULTS)/figures
ABLATION_TABLE_FLAGS = --runs $(RUNS) --pairs "$(ABLATION_PAIRS)" \
  --variants "$(ABLATION_VARIANTS)" --seeds "$(SEEDS)" --kind ablations

## help: list the targets
help:
	@sed -n 's/^## //p' $(MAKEFILE_LIST)

## cifar-all: everything for the paper's Table 4 -> results/cifar100.md and .csv
# (dataset-all is the same for any DATASET: imagenet-all runs it with the ImageNet knobs.)
cifar-all dataset-all: $(PLAN_COST) $(MAIN_RUNS) $(MAIN_EVALS) $(TABLES)

# The estimate of the runs still to do on a CPU (epochs x seconds per epoch, this CPU measured), and
# how to go faster. It never stops the plan.
plan-cost: | $(DEPS)
	@$(PY) plan_cost.py --device $(DEVICE) --epochs $(EPOCHS) $(RUNS_TO_DO)

## download: CIFAR-100 into DATA_DIR (online; offline it says what to fetch by hand)
download: $(DATA_DIR)/cifar-100-python/test

## fetch-teachers: the paper's teachers of PAIRS, or T=vgg13's, into checkpoints/cifar100/, verified
fetch-teachers: $(foreach a,$(filter $(FETCHED),$(or $(T),$(TEACHER_ARCHS))),$(TEACHERS)/$a.pt)

## imagenet-all: the paper's Table 1, 4 pairs x (PEFD, KD), the Student row -> results/imagenet.md
# (and .csv)
imagenet-all:
	$(MAKE) dataset-all $(IMAGENET_KNOBS)

## imagenet-r34-r18: Table 1's pair (a), ResNet34 -> ResNet18, alone; then results/imagenet.md
# (from whatever has finished)
imagenet-r34-r18:
	$(MAKE) pair T=resnet34 S=resnet18 $(IMAGENET_KNOBS)
	$(MAKE) tables $(IMAGENET_KNOBS)

## imagenet-r50-mobilenet: Table 1's pair (b), ResNet50 -> MobileNet, alone; then the table likewise
imagenet-r50-mobilenet:
	$(MAKE) pair T=resnet50 S=mobilenet_v1 $(IMAGENET_KNOBS)
	$(MAKE) tables $(IMAGENET_KNOBS)

## teachers: fetch (TEACHERS_FROM=fetch) or pretrain the teachers of PAIRS (one that exists is kept)
teachers: $(foreach a,$(TEACHER_ARCHS),$(TEACHERS)/$a.pt)

## pair T=vgg13 S=vgg8: every method and seed of one pair
PAIR_USAGE = usage: make pair T=<teacher> S=<student>
pair:
	@test -n "$(T)" -a -n "$(S)" || { echo "$(PAIR_USAGE)" >&2; exit 2; }
	$(MAKE) $(call student_runs,$(S)) $(call pair_runs,$(T):$(S))

## ablations: projector number, depth and activation on ABLATION_PAIRS -> results/ablations.md
ablations: $(ABLATION_EVALS) $(RESULTS)/ablations.md

## tables: the tables and their figures from whatever has finished; trains and evaluates nothing
# (unfinished runs show as missing)
tables: | $(RESULTS) $(DEPS)
	$(PY) tables.py $(MAIN_TABLE_FLAGS) --out "$(TABLES)" $(FIGURES)
ifneq ($(DATASET),imagenet)
	$(PY) tables.py $(ABLATION_TABLE_FLAGS) --out $(RESULTS)/ablations.md $(FIGURES)
endif

## bench: training throughput (projkd.py bench) -> results/bench.json, bench.md; runs every time
# (and results/figures/bench.png)
# The figure is drawn here, not under LAUNCH; a python without matplotlib (a GPU node's) skips it
# with one line.
bench: | results $(DEPS)
	$(LAUNCH) $(PY) projkd.py bench --device $(DEVICE) --out-dir results
	$(PY) tables.py --kind bench --bench results/bench.json --figures results/figures

## gpu-check: on a GPU machine, the gpu tests, make bench, two short runs -> results/gpu-check.md
# The two short runs are vgg13->vgg8, fast paths on, then off; the report also goes to .json.
# Each step is timed out and recorded by gpu_check.py, and the check goes on after a failure; the
# report says what passed and ends non-zero if anything failed. About 6 minutes on one H100 (an
# estimate: docs/gpu-check.md), never more than its 8-minute budget. Without CUDA it stops at its
# first command, writing nothing. It installs nothing (DEPS= below): a GPU node's python3 cannot.
# The teacher of the short runs: a VGG13 checkpoint (ours or RepDistiller's ckpt_epoch_240.pth);
# where there is none, a randomly initialised VGG13, and the report says so.
GPU_CHECK_TEACHER ?= $(TEACHERS)/vgg13.pt
# Epochs of each short run.
GPU_CHECK_EPOCHS ?= 3
# The GPU: DEVICE where it names one (cuda:N), else cuda:0.
GPU_CHECK_DEVICE = $(if $(filter cuda:%,$(DEVICE)),$(DEVICE),cuda:0)
GPU_CHECK_CKPT = $(or $(wildcard $(GPU_CHECK_TEACHER)),checkpoints/gpu-check/vgg13-random.pt)
GPU_CHECK_CACHE = checkpoints/gpu-check/vgg13.tcache
# CIFAR-100 when DATA_DIR holds it, else generated data of its size and classes (the report says so
# plainly).
GPU_CHECK_CIFAR = $(wildcard $(DATA_DIR)/cifar-100-python/test)
GPU_CHECK_SYNTHETIC = --dataset synthetic --synthetic-size 50000 --synthetic-classes 100
GPU_CHECK_DATA = $(if $(GPU_CHECK_CIFAR),--dataset cifar100,$(GPU_CHECK_SYNTHETIC)) \
  --data-dir $(DATA_DIR)
GPU_CHECK_RUN = $(PY) projkd.py $(GPU_CHECK_DATA) --device $(GPU_CHECK_DEVICE) \
  --epochs $(GPU_CHECK_EPOCHS) --teacher vgg13 --teacher-ckpt $(GPU_CHECK_CKPT) --student vgg8 \
  --method pefd --seed 1 --overwrite
# make bench through a variable: make -n runs every line that names $(MAKE) itself, and this one
# records a step.
GPU_CHECK_MAKE = $(MAKE)
# The command of each step, after gpu_check.py step NAME [--needs ...] --timeout S --
GPU_CHECK_TESTS = $(PY) -m pytest -v -rs -m gpu -o junit_family=legacy \
  --junitxml results/gpu-check/tests.xml test_gpu.py
GPU_CHECK_BENCH = $(GPU_CHECK_MAKE) bench PY=$(PY) DEVICE=$(GPU_CHECK_DEVICE) DEPS=
GPU_CHECK_RANDOM_TEACHER = $(PY) gpu_check.py random-teacher --arch vgg13 --classes 100 \
  --out $(GPU_CHECK_CKPT)
GPU_CHECK_BUILD_CACHE = $(PY) projkd.py cache --teacher vgg13 --teacher-ckpt $(GPU_CHECK_CKPT) \
  --teacher-cache-file $(GPU_CHECK_CACHE) $(GPU_CHECK_DATA) --device $(GPU_CHECK_DEVICE)
GPU_CHECK_FAST_RUN = $(GPU_CHECK_RUN) --teacher-cache on --teacher-cache-file $(GPU_CHECK_CACHE) \
  --graph on --run-dir runs/gpu-check/fast
GPU_CHECK_PLAIN_RUN = $(GPU_CHECK_RUN) --teacher-cache off --graph off \
  --run-dir runs/gpu-check/plain
GPU_CHECK_STEP = $(PY) gpu_check.py step
.PHONY: gpu-check
gpu-check:
	$(PY) gpu_check.py start --budget 480
	$(GPU_CHECK_STEP) tests --timeout 210 -- $(GPU_CHECK_TESTS)
	$(GPU_CHECK_STEP) bench --timeout 180 -- $(GPU_CHECK_BENCH)
ifeq ($(wildcard $(GPU_CHECK_TEACHER)),)
	$(GPU_CHECK_STEP) teacher --timeout 60 -- $(GPU_CHECK_RANDOM_TEACHER)
endif
	$(GPU_CHECK_STEP) cache --needs teacher --timeout 200 -- $(GPU_CHECK_BUILD_CACHE)
	$(GPU_CHECK_STEP) fast --needs teacher,cache --timeout 120 -- $(GPU_CHECK_FAST_RUN)
	$(GPU_CHECK_STEP) plain --needs teacher --timeout 120 -- $(GPU_CHECK_PLAIN_RUN)
	$(PY) gpu_check.py report

## gpu-preflight: on CUDA, the checks every training waits for -> results/gpu-preflight.json
# The gpu tests that guard a run's default path (graph = eager in bf16, the cached teacher rows =
# the live teacher's, a bf16 run's losses finite and falling, evaluation on CUDA = on the CPU),
# through LAUNCH, in at most 3 minutes, once per GPU model and torch version: the command runs
# before every make's trainings, and reuses a passed report of the same GPU and torch. A failed
# check stops the pipeline with one line. PREFLIGHT=off records that it was skipped (the tables'
# conditions say so); on the CPU (DEVICE=cpu, or auto without a GPU) there is none. A GPU as
# GPU_VISIBLE finds one, but for any TEACHER_CACHE.
PREFLIGHT_GPU := $(if $(filter cuda%,$(DEVICE)),yes,$(if $(filter auto,$(DEVICE)),$(GPU_VISIBLE)))
PREFLIGHT_JSON := $(if $(PREFLIGHT_GPU),results/gpu-preflight.json)
.PHONY: gpu-preflight preflight-every-time
gpu-preflight: results/gpu-preflight.json
.PRECIOUS: results/gpu-preflight.json
results/gpu-preflight.json: preflight-every-time | results $(DEPS)
ifeq ($(PREFLIGHT),off)
	$(PY) gpu_check.py preflight --off --out $@
else
	$(LAUNCH) $(PY) gpu_check.py preflight --timeout 180 --out $@
endif

## smoke: the whole chain (teacher, students, every method, ablations, tables), generated data, CPU
# (2 seeds, 3 ablation variants)
# First its teacher, trained for 8 epochs into the checkpoint the 2-epoch pipeline then uses as it
# is (a teacher trained longer than its students, as real ones are), then the pipeline itself;
# lr / 10 for the last epochs.
SMOKE = DATASET=synthetic SEEDS="1 2" DEVICE=cpu PAIRS=resnet20:resnet8 \
  ABLATION_PAIRS=resnet20:resnet8 ABLATION_VARIANTS="q0 depth2 gelu" \
  TEACHERS=checkpoints/synthetic-e2 EVAL_EXTRA="--synthetic-size 512"
SMOKE_TEACHER = EPOCHS=8 EXTRA="--synthetic-size 512 --batch-size 32 --lr-decay-epochs 6"
SMOKE_PIPELINE = EPOCHS=2 EXTRA="--synthetic-size 512 --batch-size 32 --lr-decay-epochs 1"
SMOKE_RESULTS = results/synthetic-e2
# Its start, to tell at the end whether anything ran: a table newer than it was made again.
SMOKE_STARTED = runs/.smoke-started
SMOKE_TABLES = $(SMOKE_RESULTS)/synthetic.md $(SMOKE_RESULTS)/ablations.md
SMOKE_RAN = find $(SMOKE_TABLES) -newer $(SMOKE_STARTED) 2>/dev/null
SMOKE_UP_TO_DATE = smoke: up to date, nothing ran (make clean first to run it again)
SMOKE_DONE = smoke: the whole chain ran. Its numbers only show that it works: 2 epochs on 512 \
  generated images, 128 test images (one is 0.8 points), 2 seeds; they say nothing about the \
  methods (docs/pipeline.md: make smoke).
smoke: | runs
	@touch $(SMOKE_STARTED)
	OMP_NUM_THREADS=1 $(MAKE) teachers $(SMOKE) $(SMOKE_TEACHER)
	OMP_NUM_THREADS=1 $(MAKE) -j2 cifar-all ablations $(SMOKE) $(SMOKE_PIPELINE)
	@if [ -z "$$($(SMOKE_RAN))" ]; then echo "$(SMOKE_UP_TO_DATE)"; fi
	@if [ -n "$$($(SMOKE_RAN))" ]; then echo "$(SMOKE_DONE)"; fi

## docs: make smoke, then from its results the docs' smoke table and docs/smoke-curves.png
# (the table is in docs/pipeline.md)
SMOKE_DOCS = --doc docs/pipeline.md --figure docs/smoke-curves.png
docs: smoke
	$(PY) smoke_docs.py --results $(SMOKE_RESULTS) $(SMOKE_DOCS)

## test: install the requirements into $(PY) if needed, then lint and test (CPU)
# (requirements-dev.txt has ruff)
test: | $(DEPS)
	$(PY) -m ruff check .
	$(PY) -m pytest -q

## clean: remove the smoke pipeline's files (runs/synthetic*, ...); real runs only go by hand
SMOKE_FILES = runs/synthetic* $(SMOKE_STARTED) checkpoints/synthetic* results/synthetic*
clean:
	rm -rf $(SMOKE_FILES) .pytest_cache __pycache__

# --- rules ----------------------------------------------------------------------------------------

# One pattern rule with two targets: a single run of its recipe writes both. (Naming the runs in an
# explicit rule too, as cifar-all does, keeps Make from treating them as intermediates that need not
# exist.)
$(RESULTS)/%.md $(RESULTS)/%.csv: $(MAIN_RUNS) $(MAIN_EVALS) | $(RESULTS) $(DEPS)
	$(PY) tables.py $(MAIN_TABLE_FLAGS) --out "$(RESULTS)/$*.md $(RESULTS)/$*.csv" $(FIGURES)

$(RESULTS)/ablations.md: $(ABLATION_RUNS) $(ABLATION_EVALS) | $(RESULTS) $(DEPS)
	$(PY) tables.py $(ABLATION_TABLE_FLAGS) --out $@ $(FIGURES)

# A teacher checkpoint that exists is used as is (one copied in by hand, say: docs/teachers.md);
# otherwise it is, on CIFAR-100 with TEACHERS_FROM=fetch, RepDistiller's, fetched and checked
# against its published accuracy (it needs internet, so it runs without LAUNCH; offline, projkd.py
# says which file to put where); on ImageNet torchvision's pretrained weights (likewise); else the
# model.pt of that architecture's ce run with TEACHER_SEED, with a <arch>.json that says so. (An
# explicit static rule, so it wins over the pattern rule for the archive's architectures.)
ifeq ($(DATASET),imagenet)
$(TEACHERS)/%.pt: | $(TEACHERS) $(DEPS)
	$(PY) projkd.py fetch-weights --arch $* --out $@
else
# The ce run whose model.pt becomes the teacher checkpoint of architecture $*.
TEACHER_RUN = $(RUNS)/$*/ce-seed$(TEACHER_SEED)
$(TEACHERS)/%.pt: $$(if $$(wildcard $$@),,$(RUNS)/%/ce-seed$(TEACHER_SEED)/metrics.json) \
    | $(TEACHERS)
	printf '{"how": "trained here", "run": "%s"}\n' $(TEACHER_RUN) > $(TEACHERS)/$*.json.tmp
	mv $(TEACHERS)/$*.json.tmp $(TEACHERS)/$*.json
	cp $(TEACHER_RUN)/model.pt $@.tmp
	mv $@.tmp $@
endif
FETCH_TEACHERS = $(PY) projkd.py fetch-teachers
$(FETCHED:%=$(TEACHERS)/%.pt): $(TEACHERS)/%.pt: | $(TEACHERS) $(DEPS) $(DATA) $(COST_FIRST)
	$(FETCH_TEACHERS) --arch $* --url $(TEACHERS_URL) --out-dir $(TEACHERS) $(DATA_DEVICE_FLAGS)

# A teacher's outputs on all 162 crop/flip views of every training image: one file per checkpoint.
BUILD_CACHE = $(LAUNCH) $(PY) projkd.py cache
CACHE_FILES = --teacher-ckpt $< --teacher-cache-file $@
$(TEACHERS)/%.tcache: $(TEACHERS)/%.pt | $(DEPS) $(DATA)
	$(BUILD_CACHE) --teacher $* $(CACHE_FILES) $(DATA_DEVICE_FLAGS) $(EXTRA)

# Every run, from its stem; a distillation run depends on its teacher's checkpoint. Its teacher's
# cache (USE_CACHE) only has to exist when it starts: a cache rebuilt for one run to redo must not
# make the finished ones out of date.
$(RUNS)/%/metrics.json: $$(if $$(call stem_teacher,$$*),$$(call stem_teacher_ckpt,$$*)) \
    | $$(call stem_cache,$$*) $(DEPS) $(DATA) $(FETCHED_FIRST) $(PREFLIGHT_JSON) $(COST_FIRST)
	$(RUN) $(call run_flags,$*) --run-dir $(RUNS)/$* --resume $(EXTRA)

# The evaluation step: the file a user deploys (a run's model.pt, a teacher checkpoint), loaded
# alone and evaluated once on the test set (ImageNet: val/) in float32, on the run's device; the
# tables read these, not the training loop's own numbers. A run's data settings (--synthetic-size,
# --image-size) come from its metrics.json; a teacher's from EVAL_EXTRA.
EVAL = $(LAUNCH) $(PY) projkd.py eval
EVAL_FLAGS = $(DATA_DEVICE_FLAGS) $(EVAL_EXTRA)
$(RUNS)/%/model.eval.json: $(RUNS)/%/metrics.json | $(DEPS) $(DATA)
	$(EVAL) --arch $(call stem_student,$*) --ckpt $(RUNS)/$*/model.pt $(EVAL_FLAGS)

$(TEACHERS)/%.eval.json: $(TEACHERS)/%.pt | $(DEPS) $(DATA)
	$(EVAL) --arch $* --ckpt $< $(EVAL_FLAGS)

# Only where the data is missing: projkd.py download fetches the official archive with torchvision
# (needs internet; offline it stops with one line saying what to do).
$(DATA_DIR)/cifar-100-python/test: | $(DEPS)
	$(PY) projkd.py download --dataset cifar100 --data-dir $(DATA_DIR)

# ImageNet is never downloaded (docs/imagenet.md): without it, stop before any run starts.
NO_IMAGENET = make: no ImageNet in $(DATA_DIR)/: put its train/ and val/ class folders there, \
  or set IMAGENET_DIR (docs/imagenet.md)
$(DATA_DIR)/val:
	@echo "$(NO_IMAGENET)" >&2; exit 2

.deps-installed.d/%: requirements.txt requirements-dev.txt
	$(INSTALL)
	mkdir -p $(@D)
	touch $@

.venv/.deps-installed: requirements.txt requirements-dev.txt | $(VENV_PY)
	$(INSTALL)
	touch $@

# torch with its CUDA wheels is over 5 GB: a venv of its own keeps it out of the system python.
$(VENV_PY):
	python3 -m venv .venv

$(sort $(TEACHERS) $(RESULTS) results runs):
	mkdir -p $@

# make own (docs/your-own.md): a Makefile copied without own.mk still works
-include own.mk
