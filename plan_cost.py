"""The cost of a Make plan before the work: what the CIFAR-100 runs still to do would take on this
machine's CPU.

    python plan_cost.py --device auto --epochs 240 runs/cifar100/vgg13-vgg8/pefd-seed1/metrics.json

`make cifar-all` runs it first, with the runs it still has to do. On a GPU (--device cuda..., or
auto where CUDA is present) it says nothing. On a CPU it says the whole plan's time: for each run,
epochs x its seconds per epoch, which is the multiply-accumulates of one epoch (the student's
forward and backward pass and the teacher's forward pass on the 50,000 training images, the
student's forward pass on the 10,000 test images) over the rate this CPU does them at, measured on
one training step of the first run's student. It never stops the plan.
"""

import argparse
import os
import sys
import time

import torch
import torch.nn as nn

import models

TRAIN_IMAGES, TEST_IMAGES, BATCH = 50_000, 10_000, 64


def macs(model):
    """Multiply-accumulates of one forward pass of one 32x32 image through the convolutions and
    linear layers."""
    total = 0

    def count(layer, inputs, output):
        nonlocal total
        if isinstance(layer, nn.Conv2d):
            per_output = (
                layer.in_channels // layer.groups * layer.kernel_size[0] * layer.kernel_size[1]
            )
            total += output.numel() * per_output
        else:
            total += layer.in_features * layer.out_features

    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    hooks = [m.register_forward_hook(count) for m in layers]
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, 32, 32))
    for hook in hooks:
        hook.remove()
    return total


def measured_rate(arch, steps=2):
    """Multiply-accumulates per second of this CPU on a training step (forward, backward: 3x the
    forward's)."""
    model = models.MODELS[arch](num_classes=100).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    images, labels = torch.randn(BATCH, 3, 32, 32), torch.randint(0, 100, (BATCH,))
    for step in range(steps + 1):  # the first one warms up
        if step == 1:
            start = time.perf_counter()
        loss = nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return 3 * macs(model) * BATCH * steps / (time.perf_counter() - start)


def run_of(path):
    """(teacher or None, student) of a run's metrics.json path:
    <pair>/<method>-seed<N>/metrics.json."""
    pair = os.path.normpath(path).split(os.sep)[-3]
    teacher, _, student = pair.rpartition("-")
    return teacher or None, student


def epoch_macs(teacher, student, cost):
    train = TRAIN_IMAGES * (3 * cost[student] + (cost[teacher] if teacher else 0))
    return train + TEST_IMAGES * cost[student]


def duration(seconds):
    if seconds >= 2 * 86400:
        return f"{seconds / 86400:.0f} days"
    if seconds >= 2 * 3600:
        return f"{seconds / 3600:.0f} h"
    return f"{seconds / 60:.0f} min"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--device",
        default="auto",
        help="the runs' device, as make's DEVICE: only a CPU (cpu, or auto without "
        "CUDA) gets an estimate (default: auto)",
    )
    parser.add_argument(
        "--epochs", type=int, default=240, help="training epochs of each run (default: 240)"
    )
    parser.add_argument("runs", nargs="*", help="the metrics.json of each run still to do")
    args = parser.parse_args(argv)
    on_cpu = args.device == "cpu" or (args.device == "auto" and not torch.cuda.is_available())
    if not on_cpu or not args.runs:
        return 0
    runs = [run_of(path) for path in args.runs]
    cost = {
        arch: macs(models.MODELS[arch](num_classes=100)) for pair in runs for arch in pair if arch
    }
    rate = measured_rate(runs[0][1])
    seconds = [args.epochs * epoch_macs(teacher, student, cost) / rate for teacher, student in runs]
    print(
        f"plan: {len(runs)} runs to do, {args.epochs} epochs each: about "
        f"{duration(sum(seconds))} on this CPU (one after another; a run "
        f"{duration(min(seconds))} to {duration(max(seconds))}: epochs x seconds per epoch, "
        f"this CPU measured now at {rate / 1e9:.0f} GMAC/s)"
    )
    print(
        'faster: a GPU (DEVICE=auto uses one), many at once on a cluster (make -j 64 cifar-all '
        'LAUNCH="srun --gres=gpu:1": docs/many-gpus.md), or a short try first '
        '(make cifar-all EPOCHS=2 SEEDS=1)'
    )
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
