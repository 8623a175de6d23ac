# make own: your teacher, your student, your class folders (docs/your-own.md), every target a file.
#   make own DATA_DIR=~/flowers TEACHER=timm:convnext_tiny.fb_in1k STUDENT=timm:resnet18
# DATA_DIR holds train/<class>/ and val/<class>/; the runs use --dataset folder: ImageNet's loader
# and protocol at OWN_IMAGE_SIZE, the class count from the folders. `make -n own ...` prints the
# whole plan.
#
#   $(OWN_RUNS)/<teacher>/ce-seed$(TEACHER_SEED)/     the teacher fine-tuned (--method ce from
#                                                     TEACHER_START)
#   $(OWN_TEACHERS)/<teacher>.pt, .json, .eval.json   its model.pt, where it came from, its
#                                                     evaluation
#   $(OWN_RUNS)/<teacher>-<student>/<method>-seed<N>/ PEFD and KD for each of SEEDS
#   $(OWN_RUNS)/<student>/ce-seed<N>/                 the student alone (the Student row)
#   <run>/model.eval.json                             each model.pt evaluated alone (projkd eval)
#   $(OWN_RESULTS)/own.md, own.csv, figures/          the table and its curves
# Names in paths are the architectures' with ':' as '_' (timm_resnet18), as projkd.path_name writes
# them. DATA_DIR, SEEDS, DEVICE, LAUNCH, PY and TEACHER_SEED are params.mk's; the knobs below are
# own.mk's.

# The teacher and the student: timm:NAME, or an architecture of the zoo (an ImageNet one at any
# size, a CIFAR one at OWN_IMAGE_SIZE=32).
TEACHER ?=
STUDENT ?=
# A teacher already fine-tuned on DATA_DIR (a model.pt of ours, a timm or plain state_dict): used as
# it is, and nothing is fine-tuned.
TEACHER_CKPT ?=
# Where the teacher's fine-tuning starts: --pretrained (timm's weights of its name, downloaded
# once), or --weights FILE (a file of those weights, e.g. saved where you are online:
# docs/your-own.md).
TEACHER_START ?= --pretrained
# Where every student run starts (PEFD, KD and the student alone alike): empty (initialised from its
# seed), --pretrained or --weights FILE.
STUDENT_START ?=
# The side of the training and evaluation crops, in pixels.
OWN_IMAGE_SIZE ?= 224
# Further projkd.py options of the teacher's fine-tuning, e.g. --epochs 30 --lr 0.01
# --lr-decay-epochs 20,25 (docs/your-own.md); empty: the folder protocol's (ImageNet's).
TEACHER_EXTRA ?=
# Further projkd.py options of every student run, e.g. --epochs 30 --lr 0.01 --batch-size 64.
OWN_EXTRA ?=
# The rows of the table besides the teacher: PEFD, KD and the student alone (sp and crd can be
# added).
OWN_METHODS ?= pefd kd ce
# The name of the folders of this data set's runs, teachers and results: DATA_DIR's last name
# (flowers for ~/flowers). OWN_RUNS, OWN_TEACHERS and OWN_RESULTS, below, can each be set too.
OWN_TAG ?= $(notdir $(abspath $(DATA_DIR)))

OWN_RUNS ?= runs/own-$(OWN_TAG)
OWN_TEACHERS ?= checkpoints/own-$(OWN_TAG)
OWN_RESULTS ?= results/own-$(OWN_TAG)
OWN_T := $(subst :,_,$(TEACHER))
OWN_S := $(subst :,_,$(STUDENT))
OWN_TEACHER_RUN := $(OWN_RUNS)/$(OWN_T)/ce-seed$(TEACHER_SEED)
OWN_TEACHER_PT := $(or $(TEACHER_CKPT),$(OWN_TEACHERS)/$(OWN_T).pt)
OWN_DATA = --dataset folder --data-dir $(DATA_DIR) --image-size $(OWN_IMAGE_SIZE) --device $(DEVICE)
OWN_PAIR_DIR := $(OWN_RUNS)/$(OWN_T)-$(OWN_S)
# <folder>/<method>-seed<N>/metrics.json for each method of $2 and each of SEEDS
own_seeded = $(foreach m,$2,$(foreach s,$(SEEDS),$1/$m-seed$s/metrics.json))
OWN_PAIR_RUNS := $(call own_seeded,$(OWN_PAIR_DIR),$(filter-out ce,$(OWN_METHODS)))
OWN_ALONE_RUNS := $(call own_seeded,$(OWN_RUNS)/$(OWN_S),$(filter ce,$(OWN_METHODS)))
OWN_STUDENT_RUNS := $(OWN_PAIR_RUNS) $(OWN_ALONE_RUNS)
# The pieces of the recipes below. A run's method and seed come from its folder's name ($1).
OWN_RUN = $(LAUNCH) $(PY) projkd.py $(OWN_DATA)
OWN_EVAL = $(LAUNCH) $(PY) projkd.py eval
own_method = $(firstword $(subst -seed, ,$1))
own_seed = $(lastword $(subst -seed, ,$1))
OWN_TEACHER_TRAINING = --student $(TEACHER) --method ce $(TEACHER_START) --seed $(TEACHER_SEED)
OWN_TEACHER_FLAGS = --teacher $(TEACHER) --teacher-ckpt $(OWN_TEACHER_PT)
own_pair_flags = $(OWN_TEACHER_FLAGS) --student $(STUDENT) --method $(call own_method,$1) \
    $(STUDENT_START) --seed $(call own_seed,$1)
own_alone_flags = --student $(STUDENT) --method ce $(STUDENT_START) --seed $1
OWN_TEACHER_JSON := $(OWN_TEACHERS)/$(OWN_T).json
OWN_TABLE_FLAGS = --kind main --runs $(OWN_RUNS) --teachers $(OWN_TEACHERS) \
    --pairs "$(OWN_T):$(OWN_S)" --methods "$(OWN_METHODS)" --seeds "$(SEEDS)"
# The fixes the one-line errors below name
OWN_NO_TEACHER_FIX = pass a fine-tuned teacher's checkpoint, or leave TEACHER_CKPT empty to \
    fine-tune one
OWN_PUT_IMAGES = put your images in $(DATA_DIR)/train/<class>/ and $(DATA_DIR)/val/<class>/ \
    (docs/your-own.md)
# What every training waits for: the packages, the class folders, and on a GPU the preflight
# (Makefile's PREFLIGHT_JSON, empty on a CPU)
OWN_NEEDS = $(DEPS) $(DATA_DIR)/train $(PREFLIGHT_JSON)
OWN_EVALS := $(OWN_STUDENT_RUNS:metrics.json=model.eval.json) $(OWN_TEACHERS)/$(OWN_T).eval.json
OWN_TABLES := $(OWN_RESULTS)/own.md $(OWN_RESULTS)/own.csv

.PHONY: own
## own DATA_DIR=DIR TEACHER=timm:A STUDENT=timm:B: your pair on your folders (docs/your-own.md)
# -> results/own-<DIR>/own.md
OWN_USAGE := usage: make own DATA_DIR=DIR TEACHER=timm:NAME STUDENT=timm:NAME [TEACHER_CKPT=FILE]
ifeq ($(and $(TEACHER),$(STUDENT)),)
own:
	@echo "$(OWN_USAGE) (docs/your-own.md)" >&2; exit 2
else
own: $(OWN_STUDENT_RUNS) $(OWN_EVALS) $(OWN_TABLES)

.PRECIOUS: $(OWN_TEACHER_PT) $(OWN_TEACHER_RUN)/metrics.json $(OWN_STUDENT_RUNS) $(OWN_EVALS)

# The teacher, fine-tuned on DATA_DIR alone (unless TEACHER_CKPT names one), then put where its
# students read it, with a .json that says where it came from (projkd.py's teacher_provenance
# follows it to the run).
$(OWN_TEACHER_RUN)/metrics.json: | $(OWN_NEEDS)
	$(OWN_RUN) $(OWN_TEACHER_TRAINING) --run-dir $(OWN_TEACHER_RUN) --resume $(TEACHER_EXTRA)

ifeq ($(TEACHER_CKPT),)
$(OWN_TEACHER_PT): $(OWN_TEACHER_RUN)/metrics.json | $(OWN_TEACHERS)
	printf '{"how": "trained here", "run": "%s"}\n' $(OWN_TEACHER_RUN) > $(OWN_TEACHER_JSON).tmp
	mv $(OWN_TEACHER_JSON).tmp $(OWN_TEACHER_JSON)
	cp $(OWN_TEACHER_RUN)/model.pt $@.tmp
	mv $@.tmp $@
else
$(TEACHER_CKPT):
	@echo "make: no TEACHER_CKPT file $@: $(OWN_NO_TEACHER_FIX)" >&2; exit 2
endif

$(OWN_TEACHERS)/$(OWN_T).eval.json: $(OWN_TEACHER_PT) | $(OWN_TEACHERS) $(DEPS) $(DATA_DIR)/train
	$(OWN_EVAL) --arch $(TEACHER) --ckpt $(OWN_TEACHER_PT) $(OWN_DATA) --out $@

# PEFD, KD (and any other method of OWN_METHODS) with the teacher.
$(OWN_PAIR_RUNS): $(OWN_PAIR_DIR)/%/metrics.json: $(OWN_TEACHER_PT) | $(OWN_NEEDS)
	$(OWN_RUN) $(call own_pair_flags,$*) --run-dir $(@D) --resume $(OWN_EXTRA)

$(OWN_ALONE_RUNS): $(OWN_RUNS)/$(OWN_S)/ce-seed%/metrics.json: | $(OWN_NEEDS)
	$(OWN_RUN) $(call own_alone_flags,$*) --run-dir $(@D) --resume $(OWN_EXTRA)

# Each student's model.pt evaluated alone; --dataset and --image-size come from the run's
# metrics.json.
$(OWN_STUDENT_RUNS:metrics.json=model.eval.json): %/model.eval.json: %/metrics.json \
    | $(DEPS) $(DATA_DIR)/train
	$(OWN_EVAL) --arch $(STUDENT) --ckpt $*/model.pt $(OWN_DATA)

# One recipe writes both files (an explicit rule with two targets would run it twice).
$(OWN_RESULTS)/own.csv: $(OWN_RESULTS)/own.md ;
$(OWN_RESULTS)/own.md: $(OWN_STUDENT_RUNS) $(OWN_EVALS) | $(DEPS)
	$(PY) tables.py $(OWN_TABLE_FLAGS) --out "$(OWN_TABLES)" --figures $(OWN_RESULTS)/figures

$(OWN_TEACHERS):
	mkdir -p $@
endif

# Without the class folders, stop before any run starts.
$(DATA_DIR)/train:
	@echo "make: no $(DATA_DIR)/train/: $(OWN_PUT_IMAGES)" >&2; exit 2
