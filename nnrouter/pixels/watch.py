"""Noticing a promoted model: ``nnrouter models promote`` swaps the model folder; workers pick it up between batches."""

from __future__ import annotations

import os
import time
from pathlib import Path

from nnrouter.pixels.modelcard import CARD_FILE, ModelCardError, load_card


class CardWatch:
    """Tells a worker when the card in its model folder names other weights than those it runs.

    One stat of model.yaml per batch: a swapped folder is a new inode. A load
    that fails (say, read across a swap) is tried again when the card changes
    again or after ``retry_s``.
    """

    def __init__(self, model_dir: Path, sha256: str, retry_s: float = 10.0) -> None:
        self.model_dir = Path(model_dir)
        self.sha256 = sha256
        self.retry_s = retry_s
        self._seen = self._key()
        self._failed_at: float | None = None

    @classmethod
    def start(cls, model_dir: Path | None, sha256: str) -> CardWatch | None:
        """A watch on ``model_dir``, or None when the running model was not loaded from there."""
        if model_dir is None:
            return None
        try:
            if load_card(model_dir).sha256 != sha256:
                return None
        except ModelCardError:
            return None
        return cls(model_dir, sha256)

    def _key(self) -> tuple[int, int, int, int] | None:
        try:
            st = os.stat(self.model_dir / CARD_FILE)
        except OSError:
            return None
        return st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size

    def changed(self) -> bool:
        """True when the folder's card is another model's: the caller loads it, then calls loaded() or failed()."""
        key = self._key()
        retry = self._failed_at is not None and time.monotonic() - self._failed_at >= self.retry_s
        if key is None or (key == self._seen and not retry):
            return False
        self._seen = key
        try:
            return load_card(self.model_dir).sha256 != self.sha256
        except ModelCardError:
            self._failed_at = time.monotonic()
            return False

    def loaded(self, sha256: str) -> None:
        self.sha256 = sha256
        self._failed_at = None

    def failed(self) -> None:
        self._failed_at = time.monotonic()
