"""One recorded verdict, as every scorer (``predict``, ``serve``, ``watch``) hands it to the records."""

from __future__ import annotations

import datetime
from dataclasses import asdict, dataclass, field
from typing import Optional

LABELS = ("false_alarm", "confirmed_defect")  # an operator's word on a verdict
VERDICTS = ("anomalous", "good", "unknown", "error")  # unknown: the model has no threshold; error: not scored
SOURCES = ("predict", "serve", "watch")


def utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


@dataclass
class Inspection:
    """What one scorer knew about one image when it gave its verdict; ``id`` and the label belong to the records.

    ``digest`` is the SHA-256 (hex) of the file's bytes as read; ``image_path`` is where the image can be read
    again (the original file for predict/watch, the service's kept copy, or None); ``overlay_path`` the overlay
    written for it, if any. Scores are None for an image that was not scored (verdict "error", ``error`` says why).
    """

    path: str  # the image's path, or the upload's name
    source: str  # one of SOURCES
    station: str  # the line PC or camera this came from (default: the host's name)
    model: str  # lineage.model_name of the model file
    model_version: int  # lineage.model_version
    verdict: str  # one of VERDICTS
    score: Optional[float] = None
    normalized: Optional[float] = None
    false_alarm_probability: Optional[float] = None
    threshold: Optional[float] = None
    digest: Optional[str] = None
    model_file: Optional[str] = None
    regions: Optional[list] = None  # regions.Regions.to_dict()["regions"]
    timings_ms: Optional[dict] = None
    image_path: Optional[str] = None
    overlay_path: Optional[str] = None
    error: Optional[str] = None
    time: datetime.datetime = field(default_factory=utc_now)  # when the verdict was given (UTC)
    # set by the records
    id: Optional[int] = None
    label: Optional[str] = None  # one of LABELS, or None
    labelled_at: Optional[datetime.datetime] = None
    labelled_by: Optional[str] = None

    def to_dict(self) -> dict:
        """JSON-ready: times as ISO 8601 with their UTC offset."""
        out = asdict(self)
        for key in ("time", "labelled_at"):
            if out[key] is not None:
                out[key] = out[key].isoformat()
        return out
