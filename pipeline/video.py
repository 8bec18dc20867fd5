"""Video bytes -> frames sampled at media.video.fps, as pictures, with PyAV.

Sampling is by timestamps, never by frame counts, so variable-frame-rate video samples the
frame that is on screen at each sample time. Between samples the decoder either keeps going
or seeks: when the container's index shows a keyframe after the current position and at or
before the next sample time, seeking there skips every frame in between (the common case
for long videos spread uniformly over 60 samples). Without an index it seeks only when the
gap is long. Frames are scaled (and rotated, per the stream's display matrix) by swscale
straight from YUV to the size the model sees, so a 4K frame never exists as RGB.
"""

from __future__ import annotations

import bisect
import io
import math
from dataclasses import dataclass

from PIL import Image

from pipeline.images import FrameSize, Picture, frame_target
from schemas.errors import ErrorCode, ItemError
from schemas.spec import VideoSpec

# Without a keyframe index, seek only across gaps longer than this (a typical GOP is <= 10 s).
BLIND_SEEK_GAP_S = 10.0
_EPSILON_S = 1e-6
# PIL transposes that apply a counter-clockwise display rotation (PyAV's frame.rotation).
_ROTATE = {90: Image.Transpose.ROTATE_90, 180: Image.Transpose.ROTATE_180, 270: Image.Transpose.ROTATE_270}


@dataclass
class SampledVideo:
    pictures: list[Picture]
    duration: float | None  # seconds, when the container says
    decoded_frames: int  # frames the decoder produced to get them (seeking keeps this low)
    seeks: int


def decode_video(data: bytes, spec: VideoSpec, frame_size: FrameSize | None = None) -> SampledVideo:
    """Sample frames; each becomes a picture of `frame_size` (width, height, or a function of
    the frame's upright size), or of its own upright size when None."""
    import av

    try:
        container = av.open(io.BytesIO(data), mode="r")
    except av.FFmpegError as exc:
        raise ItemError(ErrorCode.DECODE_CORRUPT, f"cannot open the video container: {_describe(exc)}") from None
    try:
        with container:
            return _sample(container, spec, frame_size)
    except ItemError:
        raise
    except (av.FFmpegError, ValueError, OSError, EOFError, IndexError) as exc:
        raise ItemError(ErrorCode.DECODE_CORRUPT, f"cannot decode the video: {_describe(exc)}") from None


def _sample(container, spec: VideoSpec, frame_size: FrameSize | None) -> SampledVideo:
    if not container.streams.video:
        kinds = sorted({stream.type for stream in container.streams}) or ["none"]
        raise ItemError(ErrorCode.VIDEO_NO_VIDEO_STREAM, f"the file has no video stream (streams: {', '.join(kinds)})")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"  # frame + slice threads; frames arrive in order either way
    stream.thread_count = spec.threads
    duration = duration_seconds(container, stream)
    if duration is not None and duration > spec.hard_max_seconds:
        raise ItemError(
            ErrorCode.VIDEO_TOO_LONG,
            f"the video is {duration:,.0f} s long, over media.video.hard_max_seconds = {spec.hard_max_seconds:,.0f}",
        )
    cursor = FrameCursor(container, stream)
    pictures = []
    previous = None
    for t in sample_times(duration, spec.fps, spec.max_seconds, spec.max_frames, spec.long_policy):
        frame = cursor.frame_at(cursor.start + t)
        if frame is None or (frame is previous and cursor.ended):
            break  # the stream ended before the container's duration said it would
        pictures.append(to_picture(frame, frame_size))
        previous = frame
    if not pictures:
        raise ItemError(ErrorCode.DECODE_CORRUPT, "the video stream has no decodable frames")
    return SampledVideo(pictures, duration, cursor.decoded, cursor.seeks)


def duration_seconds(container, stream) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1_000_000
    return None


def sample_times(duration: float | None, fps: float, max_seconds: float, max_frames: int, policy: str) -> list[float]:
    """Seconds from the start at which to take a frame.

    `fps` from 0 while that fits both `max_seconds` and `max_frames`. A longer video is
    sampled uniformly over its whole length with as many frames as the limits allow (policy
    `uniform`), or only its beginning is sampled (policy `truncate`). Unknown duration: the
    beginning, up to the limits (the decoder stops at the real end).
    """
    budget = max(1, min(max_frames, math.floor(max_seconds * fps + _EPSILON_S)))
    if duration is None:
        return [i / fps for i in range(budget)]
    wanted = max(1, math.ceil(duration * fps - _EPSILON_S))
    if wanted <= budget:
        return [i / fps for i in range(wanted)]
    if policy == "truncate":
        return [i / fps for i in range(budget)]
    return [i * duration / budget for i in range(budget)]


class FrameCursor:
    """Walks a stream forward to sample times, seeking over long stretches."""

    def __init__(self, container, stream):
        self.container, self.stream = container, stream
        self.time_base = float(stream.time_base)
        self.start = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
        self.keyframes = sorted(
            entry.timestamp * self.time_base for entry in stream.index_entries if entry.is_keyframe
        )
        self.frames = container.decode(stream)
        self.current = None  # the last frame shown at or before the last sample time
        self.ahead = None  # a frame already decoded past the last sample time
        self.position = None  # time of the last decoded frame
        self.decoded = self.seeks = 0
        self.ended = False

    def frame_at(self, t: float):
        """The frame on screen at `t` (the last one starting at or before it); the first frame
        when `t` is before it; the last frame when the stream ends before `t`."""
        if self.ahead is not None and self.ahead.time <= t + _EPSILON_S:
            self.current, self.ahead = self.ahead, None
        elif self.ahead is not None:
            return self.current or self.ahead
        if self._worth_seeking(t):
            self._seek(t)
        while True:
            frame = self._next()
            if frame is None:
                self.ended = True
                return self.current
            if frame.time > t + _EPSILON_S:
                self.ahead = frame
                return self.current or frame
            self.current = frame

    def _worth_seeking(self, t: float) -> bool:
        here = self.position if self.position is not None else self.start
        if self.keyframes:
            index = bisect.bisect_right(self.keyframes, t + _EPSILON_S) - 1
            return index >= 0 and self.keyframes[index] > here + _EPSILON_S
        return t - here > BLIND_SEEK_GAP_S

    def _seek(self, t: float) -> None:
        import av

        try:
            self.container.seek(int(t / self.time_base), stream=self.stream, backward=True, any_frame=False)
        except av.FFmpegError:
            self.keyframes = []  # unseekable: decode straight through from here on
            return
        self.frames = self.container.decode(self.stream)
        self.current = self.ahead = None
        self.seeks += 1

    def _next(self):
        for frame in self.frames:
            if frame.time is None:
                continue
            self.decoded += 1
            self.position = frame.time
            return frame
        return None


def to_picture(frame, frame_size: FrameSize | None) -> Picture:
    """Scale in swscale straight from YUV (bicubic, like the processors) and apply the
    display rotation; a 90/270 rotation scales to the swapped size first."""
    rotation = int(getattr(frame, "rotation", 0) or 0) % 360
    quarter = rotation in (90, 270)
    upright = (frame.height, frame.width) if quarter else (frame.width, frame.height)
    width, height = frame_target(frame_size, upright)
    if quarter:
        width, height = height, width
    image = frame.reformat(width=width, height=height, format="rgb24", interpolation="BICUBIC").to_image()
    if rotation in _ROTATE:
        image = image.transpose(_ROTATE[rotation])
    return Picture(image, image.size)


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
