"""The model card: what a model needs to be used correctly, kept beside the weights.

A model is data: ``models/<name>/model.onnx`` plus ``models/<name>/model.yaml``.
Everything the runtime must know to feed the network and read its answer
(labels in output order, input geometry, normalisation, output names,
thresholds) lives in the card, so swapping a model never needs a code change.
The card also pins the exact weights by sha256, so a card can never be paired
silently with other weights than the ones it was measured on.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from nnrouter.core import yamlfile
from nnrouter.core.yamlfile import write_atomically

__all__ = [
    "CARD_FILE",
    "MODEL_FILE",
    "InputSpec",
    "ModelCard",
    "ModelCardError",
    "Normalisation",
    "load_card",
    "sha256_file",
    "verify",
    "write_card",
]

CARD_FILE = "model.yaml"
MODEL_FILE = "model.onnx"

# Output roles each task understands; anything else is a typo worth refusing.
_CLASSIFY_ROLES = {"scores", "cam", "features", "ood"}
_DETECT_LAYOUTS = ({"predictions"}, {"boxes", "confs"})


class ModelCardError(ValueError):
    """A card that cannot be used, or weights that do not match their card."""


class _Strict(BaseModel):
    # A misspelt key in a hand-edited card must fail loudly, not fall back to a default.
    model_config = ConfigDict(extra="forbid", frozen=True)


class Normalisation(_Strict):
    """x = (pixel - mean) / std per channel, with pixels on the 0..255 scale."""

    mean: list[float]
    std: list[float]

    @field_validator("std")
    @classmethod
    def _std_positive(cls, v: list[float]) -> list[float]:
        if any(s <= 0 for s in v):
            raise ValueError("every std must be > 0")
        return v


class InputSpec(_Strict):
    size: tuple[int, int] = Field(description="[H, W] of the network input")
    channels: Literal[1, 3]
    layout: Literal["NCHW", "NHWC"]
    resize: Literal["stretch", "letterbox"]
    normalisation: Normalisation
    # Grey value of the letterbox border on the 0..255 scale; must match training
    # (114 for Ultralytics, 0 for most others).
    pad_value: int = Field(default=114, ge=0, le=255)

    @field_validator("size", mode="before")
    @classmethod
    def _size_is_h_w(cls, v: Any) -> Any:
        # Pydantic's own tuple errors ("size[1]: Field required") do not say what is wanted.
        if not isinstance(v, (list, tuple)) or len(v) != 2:
            raise ValueError(f"must be [H, W], two positive integers; got {v!r}")
        return v

    @field_validator("size")
    @classmethod
    def _size_positive(cls, v: tuple[int, int]) -> tuple[int, int]:
        if v[0] <= 0 or v[1] <= 0:
            raise ValueError("height and width must be > 0")
        return v

    @field_validator("normalisation")
    @classmethod
    def _one_value_per_channel(cls, v: Normalisation, info: Any) -> Normalisation:
        channels = info.data.get("channels")
        if channels is not None and (len(v.mean) != channels or len(v.std) != channels):
            raise ValueError(
                f"mean and std need one value per channel ({channels}); got {len(v.mean)} and {len(v.std)}"
            )
        return v


class ModelCard(_Strict):
    name: str = Field(min_length=1)
    task: Literal["classify", "detect"]
    labels: list[str] = Field(min_length=1, description="in model output order")
    input: InputSpec
    input_name: str = Field(min_length=1)
    outputs: dict[str, str]
    scores_are: Literal["probabilities", "logits"] | None = None
    version: str = Field(min_length=1)
    sha256: str
    provenance: str
    licence: str
    metrics: dict[str, Any] = Field(default_factory=dict)
    limitations: list[str] = Field(default_factory=list)
    unknown_threshold: float | None = Field(default=None, ge=0.0, le=1.0)
    # An "ood" output (distance of the image's features from everything the
    # model was trained on) above this is reported as "unknown", whatever the
    # softmax says: softmax confidence does not mean "I have seen this before".
    ood_threshold: float | None = Field(default=None, gt=0.0)
    # Classes of the 30 that the model never saw: the router must not treat
    # "not predicted" as "not present" for these.
    not_covered: list[str] = Field(default_factory=list)
    temperature: float = Field(default=1.0, gt=0.0)
    conf_threshold: float = Field(default=0.25, ge=0.0, le=1.0)
    iou_threshold: float = Field(default=0.45, ge=0.0, le=1.0)

    @field_validator("labels")
    @classmethod
    def _labels_unique(cls, v: list[str]) -> list[str]:
        if any(not s.strip() for s in v):
            raise ValueError("labels must be non-empty strings")
        dupes = sorted({s for s in v if v.count(s) > 1})
        if dupes:
            raise ValueError(f"labels must be unique; repeated: {', '.join(dupes)}")
        return v

    @field_validator("sha256")
    @classmethod
    def _sha256_hex(cls, v: str) -> str:
        v = v.strip().lower()
        if len(v) != 64 or any(c not in "0123456789abcdef" for c in v):
            raise ValueError("must be 64 hex digits (sha256 of model.onnx)")
        return v

    @field_validator("outputs")
    @classmethod
    def _outputs_fit_task(cls, v: dict[str, str], info: Any) -> dict[str, str]:
        task = info.data.get("task")
        roles = set(v)
        if task == "classify":
            if "scores" not in roles:
                raise ValueError("a classify model needs a 'scores' output")
            unknown = roles - _CLASSIFY_ROLES
            if unknown:
                raise ValueError(f"unknown output role(s) {sorted(unknown)}; classify knows {sorted(_CLASSIFY_ROLES)}")
        elif task == "detect" and roles not in _DETECT_LAYOUTS:
            raise ValueError(
                "a detect model needs either {predictions} (Ultralytics [1, 4+nc, N]) "
                f"or {{boxes, confs}} (darknet YOLOv4); got {sorted(roles)}"
            )
        if any(not name for name in v.values()):
            raise ValueError("output names must be non-empty")
        return v

    @model_validator(mode="after")
    def _classify_says_what_scores_are(self) -> ModelCard:
        # Guessing here would silently change calibrated scores, so the card must say.
        if self.task == "classify" and self.scores_are is None:
            raise ValueError("scores_are: required for a classify model ('probabilities' or 'logits')")
        return self


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in chunks so large weights do not need to fit in memory twice."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_card(model_dir: str | os.PathLike[str]) -> ModelCard:
    """Read and validate ``model_dir/model.yaml``.

    Errors name file, line, field path and reason, one problem a line, because
    the person reading them edits YAML, not pydantic models.
    """
    path = Path(model_dir) / CARD_FILE
    if not path.is_file():
        raise ModelCardError(f"{path}: model card not found")
    try:
        card = yamlfile.validate(ModelCard, path)
    except yamlfile.FileProblems as e:
        raise ModelCardError(str(e)) from None
    assert isinstance(card, ModelCard)  # yamlfile.validate returns an instance of the model it is given
    return card


def verify(model_dir: str | os.PathLike[str]) -> str:
    """Check model.onnx against the sha256 in its card; return the digest.

    Refusing is the point: a card's labels and thresholds are only true for the
    exact weights they were measured on.
    """
    card = load_card(model_dir)
    onnx_path = Path(model_dir) / MODEL_FILE
    try:
        actual = sha256_file(onnx_path)
    except FileNotFoundError:
        raise ModelCardError(f"{onnx_path}: model file not found") from None
    _require_digest(card, actual, onnx_path)
    return actual


def write_card(card: ModelCard, model_dir: str | os.PathLike[str]) -> Path:
    """Write the card as YAML in field order, atomically, so diffs between versions stay readable."""
    path = Path(model_dir) / CARD_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    data = card.model_dump(mode="json")
    text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True, default_flow_style=None)
    write_atomically(path, text.encode("utf-8"))
    return path


def _require_digest(card: ModelCard, actual: str, onnx_path: Path) -> None:
    if actual != card.sha256:
        raise ModelCardError(f"{onnx_path}: model.onnx sha256 is {actual}, card says {card.sha256}: refusing to load")
