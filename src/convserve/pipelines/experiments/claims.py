"""Claims 1-6: initialisation and activations (symmetry, vanishing, exploding, Xavier/He,
compute cost, dying ReLU)."""

from __future__ import annotations

import math
import time

import torch
from matplotlib.axes import Axes

from convserve.pipelines.experiments import Context, Finding, experiment
from convserve.training.activations import get_act_layer
from convserve.training.diagnostics import Snapshot, ratios
from convserve.training.plots import save_figure, subplots
from convserve.training.run import TrainResult, train


def _plain(depth: int, width: int = 8, pool: str = "none") -> list[dict[str, object]]:
    return [{"out_channels": width, "pool": pool}] * depth


def _layer_curve(ax: Axes, snap: Snapshot, key: str, label: str) -> None:
    values = [max(s.get(key, 0.0), 1e-30) for s in snap.layers.values()]
    ax.plot(range(1, len(values) + 1), values, marker="o", markersize=3, label=label)


@experiment("symmetry")
def symmetry(ctx: Context) -> Finding:
    steps = ctx.steps(300, 60)
    runs = {}
    for name, init in (
        ("constant", {"name": "constant", "value": 0.05}),
        ("he_normal", {"name": "he_normal"}),
    ):
        cfg = ctx.config(
            model={"blocks": [{"out_channels": 8}], "hidden": [16]},
            init=init,
            optim={"optimizer": "sgd", "lr": 0.05, "epochs": 50, "max_steps": steps},
        )
        runs[name] = train(cfg)
    const, he = runs["constant"], runs["he_normal"]
    last = const.snapshots[-1].layers
    distinct = {k: v["distinct"] for k, v in last.items() if k != "head.out"}
    ok = all(
        d <= 1 / 8 + 1e-9 or (k == "head.fc1" and d <= 1 / 16 + 1e-9) for k, d in distinct.items()
    )
    acc_c, acc_h = const.metrics["val_accuracy"], he.metrics["val_accuracy"]
    he_distinct = he.snapshots[-1].layers["block1.conv"]["distinct"]
    fig, ax = subplots(figsize=(6, 3.5))
    for name, result in runs.items():
        ax.plot(
            [s.step for s in result.snapshots],
            [s.layers["block1.conv"]["distinct"] for s in result.snapshots],
            label=name,
        )
    ax.set(
        xlabel="step",
        ylabel="share of distinct block1 filters",
        ylim=(0, 1.05),
        title="symmetry: identical filters stay identical",
    )
    ax.legend()
    return Finding(
        "symmetry",
        "Identical weights: the symmetry problem",
        "Initialising all weights to one value makes every unit of a layer compute and learn "
        "the same thing.",
        "Derivation: identical units see identical inputs and receive identical gradients, so "
        "no update can separate them (lecture notes; Goodfellow et al. 2016, section 8.4).",
        "After training with constant init, every hidden layer still has exactly one distinct "
        "filter or row (share 1/width); He init keeps all of them distinct. Exact, since the "
        "derivation leaves no room for a partial effect.",
        f"constant init after {steps} steps: distinct share {distinct} (val accuracy "
        f"{acc_c:.3f}); He: block1 distinct {he_distinct:.2f}"
        f" (val accuracy {acc_h:.3f}).",
        ok and he_distinct == 1.0,
        [save_figure(fig, ctx.folder / "symmetry.png")],
        {"constant_val_accuracy": acc_c, "he_val_accuracy": acc_h},
    )


@experiment("vanishing")
def vanishing(ctx: Context) -> Finding:
    depths = [2, 5, 10]
    grad_ratio: dict[int, float] = {}
    fig, ax = subplots(figsize=(6, 3.5))
    for depth in depths:
        # Glorot & Bengio's "standard" init: U(-1/sqrt(n), 1/sqrt(n)) is PyTorch's default.
        cfg = ctx.config(
            model={"blocks": _plain(depth), "hidden": [], "activation": "sigmoid"},
            init={"name": "default"},
            optim={"optimizer": "sgd", "lr": 0.1, "max_steps": 1},
        )
        result = train(cfg)
        snap = result.snapshots[0]
        grad_ratio[depth] = ratios(snap)["grad_ratio"]
        _layer_curve(ax, snap, "grad_std", f"sigmoid, {depth} conv layers")
    ax.set(
        yscale="log",
        xlabel="layer (input to output)",
        ylabel="std of dL/d(pre-activation)",
        title="back-propagated gradients at initialisation",
    )
    ax.legend(fontsize=8)
    figures = [save_figure(fig, ctx.folder / "gradient_by_depth.png")]
    steps = ctx.steps(600, 120)
    errors = {}
    for name, act, init in (
        ("sigmoid + standard init", "sigmoid", "default"),
        ("tanh + normalised init", "tanh", "xavier_uniform"),
    ):
        cfg = ctx.config(
            data={"name": "shapes", "image_size": 16, "shapes_samples": ctx.steps(3000, 900)},
            model={
                "blocks": [*_plain(2, 16), {"out_channels": 16}],
                "hidden": [64, 64, 64],
                "activation": act,
            },
            init={"name": init},
            optim={"optimizer": "sgd", "lr": 0.05, "epochs": 100, "max_steps": steps},
        )
        errors[name] = 1.0 - train(cfg).metrics["test_accuracy"]
    monotone = grad_ratio[2] > grad_ratio[5] > grad_ratio[10]
    ok = (
        monotone
        and grad_ratio[10] < 0.1
        and errors["sigmoid + standard init"] > errors["tanh + normalised init"] + 0.1
    )
    return Finding(
        "vanishing",
        "Saturating activations make gradients vanish, worse with depth",
        "With sigmoid units the back-propagated gradient shrinks layer by layer, and deeper "
        "networks suffer more.",
        "Glorot & Bengio 2010, Figures 6-7 and Table 1 (Shapeset-3x2 test error: sigmoid "
        "82.61%, tanh with normalised init 15.60%).",
        "(a) the ratio of the first to the last layer's gradient std falls as depth grows "
        "(2 > 5 > 10 layers) and is below 0.1 at 10 layers: each sigmoid layer multiplies the "
        "gradient by at most 0.25 times the weights' gain; (b) on our Shapeset-3x2, sigmoid with "
        "the standard init ends at least 10 points more test error than tanh with normalised "
        "init, the direction and a fraction of the paper's 67-point gap in a short CPU budget.",
        f"grad ratio first/last: {', '.join(f'{d} layers {r:.2e}' for d, r in grad_ratio.items())}"
        f"; test error after {steps} steps: "
        + ", ".join(f"{k} {v:.1%}" for k, v in errors.items())
        + ".",
        ok,
        figures,
        {
            **{f"grad_ratio_depth{d}": r for d, r in grad_ratio.items()},
            **{f"test_error_{k.split()[0]}": v for k, v in errors.items()},
        },
    )


@experiment("exploding")
def exploding(ctx: Context) -> Finding:
    steps = ctx.steps(200, 60)
    growth, outcome = {}, {}
    for scale in (1.0, 2.0, 4.0):
        cfg = ctx.config(
            model={"blocks": _plain(6), "hidden": [32]},
            init={"name": "he_normal", "scale": scale},
            optim={"optimizer": "sgd", "lr": 0.02, "epochs": 50, "max_steps": steps},
        )
        result: TrainResult = train(cfg)
        growth[scale] = ratios(result.snapshots[0])["act_growth"]
        outcome[scale] = (result.status, result.metrics.get("train_loss", math.nan))
    he_loss = outcome[1.0][1]
    big_status, big_loss = outcome[4.0]
    unstable = big_status == "diverged" or not math.isfinite(big_loss) or big_loss > 2 * he_loss
    ok = growth[4.0] > 100 and growth[1.0] < 10 and unstable
    return Finding(
        "exploding",
        "Large weights make gradients explode",
        "Weights that are too large make activations and gradients grow layer by layer, and "
        "training becomes unstable.",
        "He et al. 2015, section 2.2: each ReLU layer multiplies the variance by "
        "n Var(w) / 2; at k times the He scale that is k^2.",
        "At 4x the He scale the last hidden layer's activation std is over 100 times the "
        "first's (expected about 4^6 = 4096 across 7 layers), at 1x under 10, and training at "
        "4x diverges or ends with more than twice the loss of He init.",
        "activation growth first to last hidden layer: "
        + ", ".join(f"{k:g}x He {v:.3g}" for k, v in growth.items())
        + "; outcome: "
        + ", ".join(f"{k:g}x {s} (loss {loss:.3g})" for k, (s, loss) in outcome.items())
        + ".",
        ok,
        [],
        {f"act_growth_{k:g}x": v for k, v in growth.items()},
    )


@experiment("xavier_he")
def xavier_he(ctx: Context) -> Finding:
    depth = 30
    snaps, results = {}, {}
    steps = ctx.steps(300, 80)
    fig, ax = subplots(figsize=(6, 3.5))
    for name, act, init in (
        ("tanh + Xavier", "tanh", "xavier_normal"),
        ("ReLU + Xavier", "relu", "xavier_normal"),
        ("ReLU + He", "relu", "he_normal"),
    ):
        # A plain fully connected stack (no padding, no pooling): the setting of the
        # variance derivations, with nothing else changing the scale from layer to layer.
        cfg = ctx.config(
            model={"blocks": [], "hidden": [64] * (depth - 1), "activation": act},
            init={"name": init},
            optim={
                "optimizer": "sgd",
                "lr": 0.01,
                "momentum": 0.9,
                "epochs": 100,
                "max_steps": steps,
            },
        )
        results[name] = train(cfg)
        snaps[name] = results[name].snapshots[0]
        _layer_curve(ax, snaps[name], "act_std", name)
    ax.set(
        yscale="log",
        xlabel="layer",
        ylabel="activation std at init",
        title=f"{depth}-layer plain network: activation scale by layer",
    )
    ax.legend(fontsize=8)
    growth = {k: ratios(s)["act_growth"] for k, s in snaps.items()}
    loss = {k: r.metrics.get("train_loss", math.nan) for k, r in results.items()}
    expected = (1 / math.sqrt(2)) ** (depth - 1)
    ok = (
        0.3 < growth["ReLU + He"] < 3
        and growth["ReLU + Xavier"] < 100 * expected
        and growth["ReLU + Xavier"] < 1e-2
        and growth["tanh + Xavier"] > 0.05
        and loss["ReLU + He"] < 0.8 * loss["ReLU + Xavier"]
    )
    return Finding(
        "xavier_he",
        "Xavier suits tanh, He suits ReLU",
        "Xavier initialisation keeps the variance of activations roughly equal across layers "
        "for tanh, He initialisation does so for ReLU; with ReLU, Xavier shrinks the signal by "
        "about 1/sqrt(2) per layer, so a 30-layer plain ReLU network with Xavier stalls while "
        "He converges.",
        "Glorot & Bengio 2010, section 4.2; He et al. 2015, section 2.2 and Figure 3.",
        f"In a {depth}-layer plain network (64 units a layer) at initialisation: the "
        "last/first activation std is "
        "between 0.3 and 3 for ReLU + He; below 1e-2 for ReLU + Xavier (the derivation "
        f"predicts (1/sqrt 2)^{depth - 1} = {expected:.1e}; up to 100x that is allowed for "
        "finite width); above 0.05 for tanh + Xavier (tanh's slope below 1 shrinks it "
        f"slowly). After {steps} SGD steps ReLU + He's training loss is below 80% of "
        "ReLU + Xavier's.",
        "activation std last/first: "
        + ", ".join(f"{k} {v:.2e}" for k, v in growth.items())
        + "; training loss: "
        + ", ".join(f"{k} {v:.3f}" for k, v in loss.items())
        + ".",
        ok,
        [save_figure(fig, ctx.folder / "activation_scale.png")],
        {
            **{f"act_growth_{k}": v for k, v in growth.items()},
            **{f"loss_{k}": v for k, v in loss.items()},
        },
    )


@experiment("compute_cost")
def compute_cost(ctx: Context) -> Finding:
    # 2^18 values (1 MiB) stay in a core's cache, so the arithmetic is timed, not the memory
    # traffic that a large tensor would make every activation wait for alike.
    x = torch.randn(2**18)
    inner, repeats = 16, 15
    times: dict[str, list[float]] = {"relu": [], "sigmoid": [], "tanh": []}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one core: the arithmetic, not the thread scheduling, is timed
    try:
        with torch.no_grad():
            for _ in range(repeats):  # interleaved, so that machine noise hits all three alike
                for name in times:
                    act = get_act_layer(name)()
                    start = time.perf_counter()
                    for _ in range(inner):
                        act(x)
                    times[name].append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    best = {k: min(v) for k, v in times.items()}
    ratio = {k: best[k] / best["relu"] for k in ("sigmoid", "tanh")}
    ok = all(r > 1.3 for r in ratio.values())
    return Finding(
        "compute_cost",
        "Sigmoid and tanh cost more compute than ReLU",
        "Sigmoid and tanh need an exponential; ReLU is a comparison.",
        "Lecture notes; Krizhevsky et al. 2012, section 3.1 (ReLU networks train several times "
        "faster).",
        f"The forward pass of each activation, {inner} times over {x.numel():,} values that fit "
        "in a core's cache, on one CPU thread: sigmoid and tanh take at least 30% longer than "
        f"ReLU (best of {repeats} interleaved repeats). The forward pass is where the "
        "exponential is; the three derivatives are elementwise products of like cost "
        "(ReLU's a step, sigmoid's y(1 - y), tanh's 1 - y^2).",
        f"best of {repeats}: relu {best['relu'] * 1e3:.2f} ms, sigmoid "
        f"{best['sigmoid'] * 1e3:.2f} ms ({ratio['sigmoid']:.2f}x), tanh "
        f"{best['tanh'] * 1e3:.2f} ms ({ratio['tanh']:.2f}x).",
        ok,
        [],
        {f"{k}_over_relu": v for k, v in ratio.items()},
    )


@experiment("dying_relu")
def dying_relu(ctx: Context) -> Finding:
    steps = ctx.steps(300, 100)
    results = {}
    for act in ("relu", "leaky_relu"):
        cfg = ctx.config(
            model={
                "blocks": [{"out_channels": 8}],
                "hidden": [64, 64],
                "activation": act,
                "negative_slope": 0.1,
            },
            init={"name": "he_normal", "bias": -0.5},
            optim={"optimizer": "adam", "lr": 0.01, "epochs": 100, "max_steps": steps},
        )
        results[act] = train(cfg)
    dead = {
        k: max(v.get("dead", 0.0) for n, v in r.snapshots[-1].layers.items() if n != "head.out")
        for k, r in results.items()
    }
    acc = {k: r.metrics["val_accuracy"] for k, r in results.items()}
    ok = dead["relu"] >= 0.3 and dead["leaky_relu"] == 0.0 and acc["leaky_relu"] >= acc["relu"]
    return Finding(
        "dying_relu",
        "ReLU units can die; Leaky ReLU prevents it",
        "A ReLU unit whose input is negative for every example outputs zero, gets no "
        "gradient and stops learning; Leaky ReLU keeps a small gradient.",
        "Maas et al. 2013 (leaky rectifiers); lecture notes.",
        "Same network and data, biases started at -0.5 and Adam at lr 0.01: at the end at "
        "least 30% of some ReLU layer's units are dead on a batch (a third of a layer is far "
        "beyond the few percent of a healthy run), no Leaky ReLU unit is, and Leaky ReLU's "
        "validation accuracy is at least ReLU's.",
        f"dead share (worst hidden layer): relu {dead['relu']:.2f}, leaky_relu "
        f"{dead['leaky_relu']:.2f}; val accuracy: relu {acc['relu']:.3f}, leaky_relu "
        f"{acc['leaky_relu']:.3f}.",
        ok,
        [],
        {
            **{f"dead_{k}": v for k, v in dead.items()},
            **{f"val_accuracy_{k}": v for k, v in acc.items()},
        },
    )
