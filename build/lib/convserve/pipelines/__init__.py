"""Sweeps, selection, registration, jobs, experiments and the CLI."""
