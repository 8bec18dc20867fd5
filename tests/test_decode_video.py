"""Video: codecs and containers, sampling by timestamps (VFR), keyframe seeking, rotation,
the long-video policy, threads, and every error code — on files PyAV encodes here."""

from __future__ import annotations

import io
import os
from fractions import Fraction

import numpy as np
import pytest

from pipeline import decode as decode_mod
from pipeline.decode import Shaping
from pipeline.video import decode_video, sample_times
from schemas.errors import ErrorCode, ItemError
from schemas.spec import MediaSpec, VideoSpec

os.environ.setdefault("SVT_LOG", "1")  # libsvtav1: errors only

av = pytest.importorskip("av")


def make_video(
    times: list[float],
    codec: str = "libx264",
    container: str = "mp4",
    size: tuple[int, int] = (64, 48),
    value=lambda index, t: (index * 20) % 256,
    gop: int | None = None,
    rotation: int | None = None,
    mark: bool = False,
) -> bytes:
    """Frames at the given timestamps (VFR when irregular); frame i is a flat grey of
    value(i, t), so a test can tell which frame it got back."""
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=container) as out:
        stream = out.add_stream(codec, rate=25)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        stream.time_base = Fraction(1, 1000)
        stream.codec_context.time_base = Fraction(1, 1000)
        if gop:
            stream.codec_context.gop_size = gop
        if codec == "libx264":
            stream.options = {"preset": "ultrafast", **({"g": str(gop), "keyint_min": str(gop)} if gop else {})}
        if rotation:
            stream.set_display_rotation(rotation)
        for index, t in enumerate(times):
            pixels = np.full((size[1], size[0], 3), value(index, t), np.uint8)
            if mark:
                pixels[: size[1] // 4, : size[0] // 4] = (255, 0, 0)
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            frame.pts = int(round(t * 1000))
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buffer.getvalue()


def grey(picture) -> int:
    width, height = picture.image.size
    return int(np.asarray(picture.image)[height // 2, width // 2].mean())


def error_of(fn, *args) -> ItemError:
    with pytest.raises(ItemError) as caught:
        fn(*args)
    return caught.value


TEN_FPS_3S = [i / 10 for i in range(30)]


@pytest.mark.parametrize(
    "codec,container",
    [("libx264", "mp4"), ("libvpx-vp9", "webm"), ("libsvtav1", "mp4"), ("libx264", "mov"), ("libx264", "matroska")],
)
def test_codecs_and_containers_sample_one_frame_per_second(codec, container):
    data = make_video(TEN_FPS_3S, codec, container, size=(64, 64), value=lambda i, t: 40 + 60 * int(t))
    decoded = decode_mod.decode(data, None, MediaSpec(), Shaping(frame_size=(56, 56)))
    assert decoded.kind == "video" and decoded.as_frames
    assert decoded.n_frames == 3
    assert [p.size for p in decoded.pictures] == [(56, 56)] * 3
    assert [p.image.size for p in decoded.pictures] == [(56, 56)] * 3
    assert [round(grey(p) / 60) for p in decoded.pictures] == [round(v / 60) for v in (40, 100, 160)]


def test_variable_frame_rate_is_sampled_by_timestamps():
    # Frame i shows from times[i] to times[i+1]; at t = 0, 1, 2, 3 the screen shows frames 0, 1, 3, 3.
    times = [0.0, 0.1, 1.5, 1.6, 3.2, 3.3]
    video = decode_video(make_video(times), VideoSpec(), None)
    assert [round(grey(p) / 20) for p in video.pictures] == [0, 1, 3, 3]
    assert video.pictures[0].size == (64, 48)


def test_keyframe_seeking_skips_the_frames_between_samples():
    # 60 s at 10 fps with a keyframe every second; 5 samples spread over it.
    times = [i / 10 for i in range(600)]
    data = make_video(times, size=(32, 32), value=lambda i, t: 4 * int(t), gop=10)
    spec = VideoSpec(max_seconds=5, max_frames=5, long_policy="uniform")
    video = decode_video(data, spec, (56, 56))
    wanted = sample_times(video.duration, spec.fps, spec.max_seconds, spec.max_frames, spec.long_policy)
    assert len(wanted) == 5 and wanted[-1] > 45
    shown = [4 * int(np.floor(t * 10 + 1e-6) / 10) for t in wanted]  # the frame on screen at t
    assert all(abs(grey(p) - value) <= 3 for p, value in zip(video.pictures, shown)), [grey(p) for p in video.pictures]
    assert video.seeks >= 4
    assert video.decoded_frames < 60  # decoding straight through would be ~480 frames


def test_without_long_gaps_it_decodes_straight_through():
    data = make_video(TEN_FPS_3S, value=lambda i, t: 40 + 60 * int(t))  # one keyframe only
    video = decode_video(data, VideoSpec(), None)
    assert video.seeks == 0 and len(video.pictures) == 3


@pytest.mark.parametrize("threads", [0, 1, 4])
def test_threaded_decoding_gives_the_same_frames(threads):
    data = make_video(TEN_FPS_3S, value=lambda i, t: 40 + 60 * int(t))
    video = decode_video(data, VideoSpec(threads=threads), (56, 56))
    assert [round(grey(p) / 60) for p in video.pictures] == [round(v / 60) for v in (40, 100, 160)]


def test_rotation_metadata_is_honoured():
    data = make_video(TEN_FPS_3S[:5], size=(64, 48), value=lambda i, t: 255, rotation=90, mark=True)
    with av.open(io.BytesIO(data)) as container:
        assert next(container.decode(video=0)).rotation == 90
    picture = decode_video(data, VideoSpec(), None).pictures[0]
    assert picture.size == (48, 64)  # displayed upright: portrait
    pixels = np.asarray(picture.image)
    # 90 degrees counter-clockwise: the red mark of the top-left corner is now bottom-left.
    assert pixels[60, 4, 0] > 200 and pixels[60, 4, 1] < 60
    assert pixels[4, 4, 1] > 200
    sized = decode_video(data, VideoSpec(), (56, 40)).pictures[0]
    assert sized.image.size == (56, 40)


def test_long_videos_follow_the_policy():
    times = [i / 2 for i in range(40)] + [19.96]  # 20 s at 2 fps (the last frame lasts 1/25 s)
    data = make_video(times, size=(32, 32), value=lambda i, t: 10 * int(t))
    uniform = decode_video(data, VideoSpec(max_seconds=5, max_frames=5, long_policy="uniform"), None)
    assert [round(grey(p) / 10) for p in uniform.pictures] == [0, 4, 8, 12, 16]
    truncate = decode_video(data, VideoSpec(max_seconds=5, max_frames=5, long_policy="truncate"), None)
    assert [round(grey(p) / 10) for p in truncate.pictures] == [0, 1, 2, 3, 4]
    few_frames = decode_video(data, VideoSpec(max_seconds=60, max_frames=4, long_policy="uniform"), None)
    assert [round(grey(p) / 10) for p in few_frames.pictures] == [0, 5, 10, 15]


def test_sample_times():
    assert sample_times(3.0, 1.0, 60, 60, "uniform") == [0, 1, 2]
    assert sample_times(3.5, 1.0, 60, 60, "uniform") == [0, 1, 2, 3]
    assert sample_times(0.2, 1.0, 60, 60, "uniform") == [0]
    assert sample_times(None, 1.0, 5, 60, "uniform") == [0, 1, 2, 3, 4]
    assert sample_times(120.0, 1.0, 60, 60, "truncate") == list(range(60))
    assert sample_times(120.0, 1.0, 60, 60, "uniform") == [2 * i for i in range(60)]
    assert sample_times(10.0, 2.0, 60, 4, "uniform") == [0, 2.5, 5, 7.5]


def test_too_long_is_refused_from_the_container_duration():
    data = make_video([0.0, 5 * 3600.0], size=(32, 32))  # two frames, five hours apart
    error = error_of(decode_video, data, VideoSpec(), None)
    assert error.code == ErrorCode.VIDEO_TOO_LONG and "hard_max_seconds" in error.message
    short = make_video(TEN_FPS_3S, size=(32, 32))
    assert error_of(decode_video, short, VideoSpec(hard_max_seconds=2), None).code == ErrorCode.VIDEO_TOO_LONG


def audio_only(container: str = "mp4") -> bytes:
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=container) as out:
        stream = out.add_stream("aac", rate=16000)
        samples = np.zeros((1, 1024), dtype=np.float32)
        for index in range(20):
            frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, index * 1024
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buffer.getvalue()


def test_audio_only_has_no_video_stream():
    data = audio_only()
    assert decode_mod.sniff_kind(data) == "video"
    error = error_of(decode_mod.prepare_media, data, None, MediaSpec(), Shaping((56, 56)))
    assert error.code == ErrorCode.VIDEO_NO_VIDEO_STREAM and "audio" in error.message


def test_broken_videos_are_corrupt():
    data = make_video(TEN_FPS_3S)
    shaping = Shaping((56, 56))
    assert error_of(decode_mod.prepare_media, data[: len(data) // 2], None, MediaSpec(), shaping).code == ErrorCode.DECODE_CORRUPT
    garbage = data[:32] + bytes(range(256)) * 8
    assert error_of(decode_mod.prepare_media, garbage, None, MediaSpec(), shaping).code == ErrorCode.DECODE_CORRUPT
    webm = make_video(TEN_FPS_3S, "libvpx-vp9", "webm")
    assert error_of(decode_mod.prepare_media, webm[:200], None, MediaSpec(), shaping).code == ErrorCode.DECODE_CORRUPT
