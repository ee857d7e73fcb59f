"""The seed experiments by name, in the report's order (claims 1-6, 7-10, then 11), with the
module of ``convserve.pipelines.experiments`` that defines each. A module of its own, that
imports nothing: ``convserve experiments --help`` lists them from here, in any image."""

from __future__ import annotations

REGISTRY: dict[str, str] = {
    **dict.fromkeys(
        ["symmetry", "vanishing", "exploding", "xavier_he", "compute_cost", "dying_relu"],
        "claims",
    ),
    **dict.fromkeys(["dense_vs_cnn", "convolution", "pooling", "hierarchy"], "cnn_claims"),
    "glorot_normalised": "normalised_init",
}
