"""Service settings from the environment (``CONVSERVE_*``), read once at start-up."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CONVSERVE_", extra="ignore")

    # A local .onnx file, models:/NAME@ALIAS (followed: polled for new versions) or
    # models:/NAME/VERSION (pinned).
    model_uri: str = "models:/convserve@champion"
    device: Literal["auto", "cpu", "cuda"] = "auto"  # cuda without a GPU fails at start
    intra_op_threads: int = Field(0, ge=0)  # onnxruntime threads per operator; 0: its default
    inter_op_threads: int = Field(0, ge=0)
    poll_interval: float = Field(10.0, gt=0)  # seconds between registry checks of the alias
    cache_dir: str = ".convserve-models"  # where registry versions are downloaded
    api_token: SecretStr | None = None  # bearer token for admin endpoints and job writes

    batching: bool = True  # gather concurrent requests into one session.run
    max_batch_size: int = Field(32, ge=1, le=4096)
    max_batch_wait_ms: float = Field(2.0, ge=0.0, le=1000.0)

    max_upload_bytes: int = Field(10 * 1024 * 1024, ge=1024)  # per request body
    max_pixels: int = Field(40_000_000, ge=1)  # width * height of one image, checked first
    # images above 65,536 pixels decoded at once, in their own threads; more wait, then 503
    max_large_decodes: int = Field(2, ge=1, le=64)
    max_files: int = Field(64, ge=1)  # images per /predict request
    max_response_bytes: int = Field(32 * 1024 * 1024, ge=1024)  # estimated, before encoding
    default_top_k: int = Field(5, ge=1)

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    workers: int = Field(1, ge=1, le=64)  # uvicorn worker processes
    mlflow_ui_url: str | None = None  # shown on the web page and in job links
