# make own: your teacher, your student, your class folders (docs/your-own.md), every target a file.
#   make own DATA_DIR=~/flowers TEACHER=timm:convnext_tiny.fb_in1k STUDENT=timm:resnet18
# DATA_DIR holds train/<class>/ and val/<class>/; the runs use --dataset folder: ImageNet's loader and
# protocol at OWN_IMAGE_SIZE, the class count from the folders. `make -n own ...` prints the whole plan.
#
#   $(OWN_RUNS)/<teacher>/ce-seed$(TEACHER_SEED)/       the teacher fine-tuned (--method ce from TEACHER_START)
#   $(OWN_TEACHERS)/<teacher>.pt, .json, .eval.json      its model.pt, where it came from, its evaluation
#   $(OWN_RUNS)/<teacher>-<student>/<method>-seed<N>/    PEFD and KD for each of SEEDS
#   $(OWN_RUNS)/<student>/ce-seed<N>/                    the student alone (the Student row)
#   <run>/model.eval.json                                each model.pt evaluated alone (projkd.py eval)
#   $(OWN_RESULTS)/own.md, own.csv, figures/             the table and its curves
# Names in paths are the architectures' with ':' as '_' (timm_resnet18), as projkd.path_name writes them.
# DATA_DIR, SEEDS, DEVICE, LAUNCH, PY and TEACHER_SEED are params.mk's; the knobs below are own.mk's.

# The teacher and the student: timm:NAME, or an architecture of the zoo (an ImageNet one at any size, a CIFAR
# one at OWN_IMAGE_SIZE=32).
TEACHER ?=
STUDENT ?=
# A teacher already fine-tuned on DATA_DIR (a model.pt of ours, a timm or plain state_dict): used as it is,
# and nothing is fine-tuned.
TEACHER_CKPT ?=
# Where the teacher's fine-tuning starts: --pretrained (timm's weights of its name, downloaded once), or
# --weights FILE (a file of those weights, e.g. saved where you are online: docs/your-own.md).
TEACHER_START ?= --pretrained
# Where every student run starts (PEFD, KD and the student alone alike): empty (initialised from its seed),
# --pretrained or --weights FILE.
STUDENT_START ?=
# The side of the training and evaluation crops, in pixels.
OWN_IMAGE_SIZE ?= 224
# Further projkd.py options of the teacher's fine-tuning, e.g. --epochs 30 --lr 0.01 --lr-decay-epochs 20,25
# (docs/your-own.md); empty: the folder protocol's (ImageNet's).
TEACHER_EXTRA ?=
# Further projkd.py options of every student run, e.g. --epochs 30 --lr 0.01 --batch-size 64.
OWN_EXTRA ?=
# The rows of the table besides the teacher: PEFD, KD and the student alone (sp and crd can be added).
OWN_METHODS ?= pefd kd ce
# The name of the folders of this data set's runs, teachers and results: DATA_DIR's last name (flowers for
# ~/flowers). OWN_RUNS, OWN_TEACHERS and OWN_RESULTS, below, can each be set too.
OWN_TAG ?= $(notdir $(abspath $(DATA_DIR)))

OWN_RUNS ?= runs/own-$(OWN_TAG)
OWN_TEACHERS ?= checkpoints/own-$(OWN_TAG)
OWN_RESULTS ?= results/own-$(OWN_TAG)
OWN_T := $(subst :,_,$(TEACHER))
OWN_S := $(subst :,_,$(STUDENT))
OWN_TEACHER_RUN := $(OWN_RUNS)/$(OWN_T)/ce-seed$(TEACHER_SEED)
OWN_TEACHER_PT := $(or $(TEACHER_CKPT),$(OWN_TEACHERS)/$(OWN_T).pt)
OWN_DATA = --dataset folder --data-dir $(DATA_DIR) --image-size $(OWN_IMAGE_SIZE) --device $(DEVICE)
OWN_PAIR_RUNS := $(foreach m,$(filter-out ce,$(OWN_METHODS)),$(foreach s,$(SEEDS),$(OWN_RUNS)/$(OWN_T)-$(OWN_S)/$m-seed$s/metrics.json))
OWN_ALONE_RUNS := $(if $(filter ce,$(OWN_METHODS)),$(foreach s,$(SEEDS),$(OWN_RUNS)/$(OWN_S)/ce-seed$s/metrics.json))
OWN_STUDENT_RUNS := $(OWN_PAIR_RUNS) $(OWN_ALONE_RUNS)
OWN_EVALS := $(OWN_STUDENT_RUNS:metrics.json=model.eval.json) $(OWN_TEACHERS)/$(OWN_T).eval.json
OWN_TABLES := $(OWN_RESULTS)/own.md $(OWN_RESULTS)/own.csv

.PHONY: own
## own DATA_DIR=DIR TEACHER=timm:A STUDENT=timm:B: your pair on your class folders -> results/own-<DIR>/own.md (docs/your-own.md)
ifeq ($(and $(TEACHER),$(STUDENT)),)
own:
	@echo "usage: make own DATA_DIR=DIR TEACHER=timm:NAME STUDENT=timm:NAME [TEACHER_CKPT=FILE] (docs/your-own.md)" >&2; exit 2
else
own: $(OWN_STUDENT_RUNS) $(OWN_EVALS) $(OWN_TABLES)

.PRECIOUS: $(OWN_TEACHER_PT) $(OWN_TEACHER_RUN)/metrics.json $(OWN_STUDENT_RUNS) $(OWN_EVALS)

# The teacher, fine-tuned on DATA_DIR alone (unless TEACHER_CKPT names one), then put where its students read it,
# with a .json that says where it came from (projkd.py's teacher_provenance follows it to the run).
$(OWN_TEACHER_RUN)/metrics.json: | $(DEPS) $(DATA_DIR)/train
	$(LAUNCH) $(PY) projkd.py $(OWN_DATA) --student $(TEACHER) --method ce $(TEACHER_START) --seed $(TEACHER_SEED) --run-dir $(OWN_TEACHER_RUN) --resume $(TEACHER_EXTRA)

ifeq ($(TEACHER_CKPT),)
$(OWN_TEACHER_PT): $(OWN_TEACHER_RUN)/metrics.json | $(OWN_TEACHERS)
	printf '{"how": "trained here", "run": "%s"}\n' $(OWN_TEACHER_RUN) > $(OWN_TEACHERS)/$(OWN_T).json.tmp
	mv $(OWN_TEACHERS)/$(OWN_T).json.tmp $(OWN_TEACHERS)/$(OWN_T).json
	cp $(OWN_TEACHER_RUN)/model.pt $@.tmp
	mv $@.tmp $@
else
$(TEACHER_CKPT):
	@echo "make: no TEACHER_CKPT file $@: pass a fine-tuned teacher's checkpoint, or leave TEACHER_CKPT empty to fine-tune one" >&2; exit 2
endif

$(OWN_TEACHERS)/$(OWN_T).eval.json: $(OWN_TEACHER_PT) | $(OWN_TEACHERS) $(DEPS) $(DATA_DIR)/train
	$(LAUNCH) $(PY) projkd.py eval --arch $(TEACHER) --ckpt $(OWN_TEACHER_PT) $(OWN_DATA) --out $@

# PEFD, KD (and any other method of OWN_METHODS) with the teacher; the method and seed from the run's folder.
$(OWN_PAIR_RUNS): $(OWN_RUNS)/$(OWN_T)-$(OWN_S)/%/metrics.json: $(OWN_TEACHER_PT) | $(DEPS) $(DATA_DIR)/train
	$(LAUNCH) $(PY) projkd.py $(OWN_DATA) --teacher $(TEACHER) --teacher-ckpt $(OWN_TEACHER_PT) --student $(STUDENT) --method $(firstword $(subst -seed, ,$*)) $(STUDENT_START) --seed $(lastword $(subst -seed, ,$*)) --run-dir $(@D) --resume $(OWN_EXTRA)

$(OWN_ALONE_RUNS): $(OWN_RUNS)/$(OWN_S)/ce-seed%/metrics.json: | $(DEPS) $(DATA_DIR)/train
	$(LAUNCH) $(PY) projkd.py $(OWN_DATA) --student $(STUDENT) --method ce $(STUDENT_START) --seed $* --run-dir $(@D) --resume $(OWN_EXTRA)

# Each student's model.pt evaluated alone; --dataset and --image-size come from the run's metrics.json.
$(OWN_STUDENT_RUNS:metrics.json=model.eval.json): %/model.eval.json: %/metrics.json | $(DEPS) $(DATA_DIR)/train
	$(LAUNCH) $(PY) projkd.py eval --arch $(STUDENT) --ckpt $*/model.pt $(OWN_DATA)

# One recipe writes both files (an explicit rule with two targets would run it twice).
$(OWN_RESULTS)/own.csv: $(OWN_RESULTS)/own.md ;
$(OWN_RESULTS)/own.md: $(OWN_STUDENT_RUNS) $(OWN_EVALS) | $(DEPS)
	$(PY) tables.py --kind main --runs $(OWN_RUNS) --teachers $(OWN_TEACHERS) --pairs "$(OWN_T):$(OWN_S)" --methods "$(OWN_METHODS)" --seeds "$(SEEDS)" --out "$(OWN_TABLES)" --figures $(OWN_RESULTS)/figures

$(OWN_TEACHERS):
	mkdir -p $@
endif

# Without the class folders, stop before any run starts.
$(DATA_DIR)/train:
	@echo "make: no $(DATA_DIR)/train/: put your images in $(DATA_DIR)/train/<class>/ and $(DATA_DIR)/val/<class>/ (docs/your-own.md)" >&2; exit 2
