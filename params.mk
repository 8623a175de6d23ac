# Every knob of the pipeline, one comment each. Override any of them on the command line:
#   make cifar-all EPOCHS=2 SEEDS=1        make -j4 cifar-all DEVICE=cuda:1
# (Comments sit above the values: a trailing comment would put spaces into the value.)

# The Python that runs everything: by default .venv/bin/python, which make creates (python3 -m venv
# .venv) and fills from requirements.txt the first time; or another with torch (a conda env's, the
# system's): PY=/its/python. After `touch .deps-installed` nothing is installed, and the default is
# python3 as it is (a GPU node's own torch).
ifeq ($(wildcard .deps-installed),)
PY ?= .venv/bin/python
else
PY ?= python3
endif

# Teacher:student pairs of the paper's CIFAR-100 Table 4, the columns of results/cifar100.md.
PAIRS ?= wrn_40_2:wrn_16_2 vgg13:vgg8 resnet32x4:resnet8x4 ResNet50:vgg8 ResNet50:MobileNetV2

# Methods per pair (projkd.py --method): the paper's PEFD, the baselines, and ce, the Student row.
METHODS ?= pefd kd sp crd ce

# Seeds of every student run; the tables report mean ± std over them.
SEEDS ?= 1 2 3

# Where the CIFAR-100 teachers come from: fetch (RepDistiller's published checkpoints, the paper's
# teachers, from TEACHERS_URL, each installed only if its test top-1 matches the published one) or
# train (pretrained here, a ce run each). fetch covers wrn_40_2 vgg13 resnet32x4 ResNet50 resnet56
# resnet110 on DATASET=cifar100 at any EPOCHS; other architectures and datasets are always trained.
TEACHERS_FROM ?= fetch

# The archive fetch-teachers downloads (mdistiller's copy; RepDistiller's server is gone). Another
# mirror's URL, or the path of a copy you already have, works the same.
MDISTILLER_DOWNLOADS = https://github.com/megvii-research/mdistiller/releases/download
TEACHERS_URL ?= $(MDISTILLER_DOWNLOADS)/checkpoints/cifar_teachers.tar

# Seed of each teacher's pretraining (one teacher per architecture, shared by all its pairs), for
# those trained here.
TEACHER_SEED ?= 1

# Training epochs of every run, teachers included (the paper: 240). Other values get their own
# runs/, checkpoints/ and results/ folders (suffix -e<EPOCHS>), so a short trial never mixes with
# real runs.
EPOCHS ?= 240

# cifar100, or synthetic (generated data; `make smoke` uses it).
DATASET ?= cifar100

# Folder holding cifar-100-python/{train,test} (README: CIFAR-100).
DATA_DIR ?= data

# Where runs execute: auto (CUDA if present, else CPU), cuda, cuda:N, cpu.
DEVICE ?= auto

# A command in front of every command that trains or computes on a GPU (runs, teacher caches, bench;
# not the tables or downloads). On a Slurm login node:
#   make -j 64 cifar-all LAUNCH="srun -N1 -n1 --gres=gpu:1"
LAUNCH ?=

# The teacher-output cache of the pefd, kd and crd runs on CIFAR-style data: auto (unless
# DEVICE=cpu), on, or off. When used, each teacher's cache file, $(TEACHERS)/<arch>.tcache, is built
# once before its runs.
TEACHER_CACHE ?= auto

# Pairs and projector variants of the ablations (paper Figures 3 and 4, Table 5): q0 = no projector
# (MDA on the raw student feature), qN = N projectors, depthN = N layers each, gelu/none =
# activation.
ABLATION_PAIRS ?= vgg13:vgg8 resnet32x4:resnet8x4
ABLATION_VARIANTS ?= q0 q1 q2 q4 depth2 depth3 depth4 gelu none

# On a CUDA device, the GPU preflight before the first training (make gpu-preflight:
# docs/gpu-check.md): on, or off (train without it; the tables' conditions say so). On the CPU there
# is none.
PREFLIGHT ?= on

# Further projkd.py options for every run, e.g. EXTRA="--amp fp16" or EXTRA="--compile".
EXTRA ?=

# Further projkd.py eval options for every evaluation step: a data option of EXTRA
# (--synthetic-size, --image-size) must be here too, for the teachers' evaluations (a run's own are
# read from its metrics.json).
EVAL_EXTRA ?=

# Folder holding ImageNet's train/ and val/, one subfolder per class. On ImageNet (make
# imagenet-all: the paper's Table 1), this and the IMAGENET_ knobs below replace DATA_DIR, PAIRS,
# METHODS, SEEDS and EPOCHS.
IMAGENET_DIR ?= data/imagenet

# GPUs per ImageNet training: torchrun starts that many processes (with LAUNCH, ask it for as many
# GPUs).
NPROC ?= 1

# Teacher:student pairs of the paper's Table 1, (a) to (d): the rows of results/imagenet.md.
IMAGENET_PAIRS ?= resnet34:resnet18 resnet50:mobilenet_v1 \
  densenet201:resnet18 densenet201:mobilenet_v1

# Methods per ImageNet pair: PEFD, KD and ce, the Student row (sp and crd can be added).
IMAGENET_METHODS ?= pefd kd ce

# Seeds of every ImageNet student run.
IMAGENET_SEEDS ?= 1

# Training epochs of every ImageNet run (the paper: 100). Other values get runs/imagenet-e<N>/ and
# results/imagenet-e<N>/; the teachers stay in checkpoints/imagenet/.
IMAGENET_EPOCHS ?= 100
