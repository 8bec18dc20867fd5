"""What crosses from the CPU stage to the model actor for one row: token ids and uint8 pixels.

Pixels stay `uint8` in transit (4x smaller than float32 through Ray's object store); the
actor rescales and normalises them on its own device. The layout of `pixels` and the
`extras` are the model family's business (actors/adapters.py).
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field

import numpy as np


@dataclass
class ModelInputs:
    input_ids: np.ndarray  # int32 [sequence], image placeholders already expanded
    pixels: np.ndarray | None  # uint8, layout defined by the adapter (e.g. [tiles, 3, H, W])
    extras: dict[str, np.ndarray] = field(default_factory=dict)  # e.g. image_sizes, patches per image
    n_tiles: int = 0
    # For engines that run the model's processor themselves (vLLM): the chat-templated
    # prompt and the decoded, downscaled images (uint8 [H, W, 3] each); `pixels` is None.
    text: str | None = None
    images: list[np.ndarray] | None = None

    @property
    def pixel_bytes(self) -> int:
        if self.images is not None:
            return sum(int(image.nbytes) for image in self.images)
        return 0 if self.pixels is None else int(self.pixels.nbytes)

    def to_bytes(self) -> bytes:
        return pickle.dumps(
            {
                "input_ids": self.input_ids, "pixels": self.pixels, "extras": self.extras, "n_tiles": self.n_tiles,
                "text": self.text, "images": self.images,
            },
            protocol=5,
        )

    @staticmethod
    def from_bytes(blob: bytes) -> "ModelInputs":
        return ModelInputs(**pickle.loads(blob))
