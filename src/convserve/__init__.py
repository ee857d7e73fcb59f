"""convserve: train, explain, track and serve CNN image classifiers."""

import os

__version__ = "0.1.0"

# onnxruntime's Linux builds (1.29 and later) send usage events to Microsoft, among them each
# session's model file name and graph hashes, unless ORT_DISABLE_TELEMETRY is set when it is
# imported. Every convserve process imports this package before onnxruntime, so none sends
# them; a value already in the environment is left as it is.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
