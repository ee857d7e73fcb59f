from tests.service.conftest import onnx_path  # noqa: F401  (a trained export, session-wide)
