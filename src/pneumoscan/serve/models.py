"""The answers of the HTTP API as Pydantic models: what FastAPI validates each response against and what the
OpenAPI schema (``/openapi.json``) documents, for the 200 answers and the errors alike."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ..pipeline import STATUSES

Status = Literal[STATUSES]  # type: ignore[valid-type]  (the stage's one list)


class ErrorBody(BaseModel):
    """Every refusal: one line saying what was refused and why, with the matching status code."""

    error: str = Field(description="one line: what was refused and why")


class ModelRef(BaseModel):
    name: str
    sha256: str


class Health(BaseModel):
    status: Literal["ok"]
    version: str
    model: ModelRef


class Prevalence(BaseModel):
    fitted: float | None = Field(description="pneumonia share of the validation images the calibration was fitted on")
    used: float | None = Field(description="the share probabilities are re-based to (--prevalence), else fitted")


class Batching(BaseModel):
    batch_window_ms: float
    max_batch: int
    max_pending: int


class ModelInfo(BaseModel):
    """The served model: what the model file records (arch, classes, preprocessing, validation, guard, ...) and
    how this server runs it."""

    model_config = ConfigDict(extra="allow")  # the model file's metadata fields pass through as recorded

    name: str
    sha256: str
    thresholds: dict[str, float] = Field(description="operating point -> threshold on the probability")
    temperature: float
    bias: float
    prevalence: Prevalence
    backend: str
    runtime: str
    heatmap: bool = Field(description="whether this server can draw Grad-CAM heatmaps (torch backend)")
    max_upload_bytes: int
    formats: str = Field(description="the image formats /v1/predict accepts")
    batching: Batching
    model_card: str | None = Field(description="where the model card is, for the bundled model")


class Screening(BaseModel):
    """One screened image. ``probability`` and ``decision`` are set only when ``status`` is ``ok``;
    ``message`` says why not otherwise. The heatmap fields are present only when the request asked for a heatmap;
    ``heatmap_png_base64`` is then null with ``heatmap_reason`` saying why (the rule: PNEUMONIA decisions only,
    unless ``heatmaps=all``; never for an image the model did not judge)."""

    filename: str
    probability: float | None
    decision: str | None
    operating_point: str
    threshold: float
    thresholds: dict[str, float]
    decisions: dict[str, str] | None = Field(description="the decision at every named operating point (status ok)")
    status: Status
    message: str
    guard_score: float | None
    model: ModelRef
    timing_ms: dict[str, float]
    batch_size: int = Field(description="images that shared this image's network call")
    request_id: str | None
    heatmap_png_base64: str | None = Field(default=None, description="Grad-CAM overlay, PNG (heatmap=true)")
    heatmap_reason: str | None = Field(default=None, description="why heatmap_png_base64 is null")
    image_png_base64: str | None = Field(default=None, description="the decoded image as 8-bit PNG (preview=true)")


def error_responses(*codes: tuple[int, str]) -> dict:
    """The ``responses=`` of a route: each refusal documented with the one error body."""
    return {code: {"model": ErrorBody, "description": text} for code, text in codes}
