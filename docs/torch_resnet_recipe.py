"""PyTorch's side of the resnet recipe's accuracy (docs/benchmarks.md, issue 11).

The same network in torch (gpucnn.tools.bench.torch_resnet, torchvision's initialisation),
trained with torch's SGD and CosineAnnealingLR on exactly the batches gpucnn's
`gpucnn train --model resnet` sees: gpucnn's data loading and standardisation, its
per-epoch permutation (numpy default_rng(seed)) and its augmentation draws
(gpucnn.augment with the run's seed). Only the network's arithmetic and its random
initial weights differ, so the two test accuracies say whether gpucnn trains as
PyTorch does.

    OPENBLAS_NUM_THREADS=1 python3 docs/torch_resnet_recipe.py --epochs 2 [--seed 0]
        [--augment crop+flip|crop|flip|none]
"""
import argparse
import math
import pathlib
import sys
import time

import numpy
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from gpucnn.tools import bench  # noqa: E402
from gpucnn.app import data
from gpucnn.app.config import Config, make_augment  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--augment", help="as gpucnn train --augment (default: the "
                        "recipe's, crop+flip on Fashion-MNIST)")
    args = parser.parse_args()
    config = Config(dataset=args.dataset, model="resnet", epochs=args.epochs,
                    seed=args.seed, augment=args.augment).filled()
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    ds = data.load(config.dataset, seed=config.seed)
    net = bench.torch_resnet(torch)
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    steps = math.ceil(len(ds.train_y) / config.batch_size)
    opt = torch.optim.SGD(net.parameters(), lr=config.lr, momentum=config.momentum,
                          nesterov=config.nesterov, weight_decay=config.weight_decay)
    assert config.schedule == "cosine" and not config.warmup, config
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=config.epochs * steps)
    augment = make_augment(config, ds.stats, config.seed + 1)
    rng = numpy.random.default_rng(config.seed)
    test_x, test_y = torch.from_numpy(ds.test_x), torch.from_numpy(ds.test_y)
    print(f"torch {torch.__version__}, {config.dataset}, {config.epochs} epochs, "
          f"seed {config.seed}, augment {augment!r}", flush=True)
    for epoch in range(config.epochs):
        t0 = time.perf_counter()
        net.train()
        for xb, yb in data.batches(ds.train_x, ds.train_y, config.batch_size, "cpu",
                                   rng.permutation(len(ds.train_y))):
            xb = augment(xb) if augment is not None else xb
            loss = torch.nn.functional.cross_entropy(net(torch.from_numpy(xb)),
                                                     torch.from_numpy(yb))
            opt.zero_grad()
            loss.backward()
            opt.step()
            schedule.step()
        net.eval()
        with torch.no_grad():
            correct = sum(int((net(test_x[i:i + 1000]).argmax(1) == test_y[i:i + 1000]).sum())
                          for i in range(0, len(test_y), 1000))
        print(f"epoch {epoch + 1}/{config.epochs}: test accuracy "
              f"{100 * correct / len(test_y):.2f}%, {time.perf_counter() - t0:.0f} s",
              flush=True)


if __name__ == "__main__":
    main()
