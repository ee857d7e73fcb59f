"""A new SQLite tracking store opened by several processes at once."""

import subprocess
import sys

from tests.waiting import limit

# A process as ``convserve serve``'s workers are: MLflow imported, then the store opened at
# the same moment as its siblings (they wait for one file), then the registry read.
OPENER = """
import sys, time
from pathlib import Path
from convserve.training.tracking import mlflow_client
go = Path(sys.argv[2])
while not go.exists():
    time.sleep(0.005)
client = mlflow_client(sys.argv[1])
print(len(client.search_registered_models()), flush=True)
"""


def test_processes_opening_a_new_sqlite_store_at_once_all_open_it(tmp_path):
    """MLflow makes a new store's tables in whichever process opens it first; four at once
    all tried, and the others failed ("table logged_models already exists"). Through
    ``mlflow_client`` one makes them and the others find them."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    go = tmp_path / "go"
    openers = [
        subprocess.Popen(
            [sys.executable, "-c", OPENER, uri, str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    go.touch()
    for opener in openers:
        out, err = opener.communicate(timeout=limit(120))
        assert opener.returncode == 0, err[-2000:]
        assert out.strip() == "0"  # the store opened, with no model in it
