"""Config schemas, CNN builder, registries, data, training loop, diagnostics, tracking."""

from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"  # the shipped YAML configs


def shipped_configs() -> list[str]:
    """The names of the shipped training configs (no YAML is read: the CLI lists them in its
    help text)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
