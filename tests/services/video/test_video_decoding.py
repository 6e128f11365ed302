"""Videos in (services/video/): a PyAV write/read round trip in every container, the sampling indices, datasets of
videos (folders, manifests with spans; mixing refused), and every bad video: corrupt, truncated, empty, not a video,
too long; skipped and counted or failing the job by name; a short one padded, which the job's events say."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from services.data.datasets import DatasetError, read_dataset
from services.data.loading import iterate
from services.extraction import run_extraction
from services.jobs.progress import NullReporter
from services.spec import JobSpec
from services.training.job import train_job
from services.video.decoding import ClipTransform, VideoTooLong, read_clip
from services.video.loading import ClipReader
from services.video.sampling import clip_indices
from services.video.spec import VideoSpec
from services.video.synthetic import CODECS, write_motion, write_video
from storage.settings import Settings

RAW = np.asarray  # frames as decoded (a picklable function: it travels to the loader processes)


def frames(n: int, h: int = 32, w: int = 48, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("suffix", sorted(CODECS))
def test_round_trip_in_every_container(tmp_path: Path, suffix: str) -> None:
    smooth = np.repeat(np.linspace(0, 255, 48, dtype=np.uint8)[None, None, :, None], 32, axis=1)  # compresses well
    video = np.broadcast_to(smooth, (6, 32, 48, 3)).copy()
    video[:, :, :, 1] = np.arange(6, dtype=np.uint8)[:, None, None] * 40  # frames differ: the order shows
    path = write_video(tmp_path / f"v{suffix}", video)
    clip = read_clip(path, VideoSpec(num_frames=6, tubelet=1), RAW)
    assert clip.frames.shape == (6, 32, 48, 3) and clip.total == 6 and not clip.padded
    if suffix == ".mkv":  # ffv1 RGB: lossless
        assert np.array_equal(clip.frames, video)
    else:
        assert np.abs(clip.frames.astype(int) - video).mean() < 4


def test_lossless_round_trip_of_noise_and_sampled_frames(tmp_path: Path) -> None:
    video = frames(16)
    path = write_video(tmp_path / "n.mkv", video)
    assert np.array_equal(read_clip(path, VideoSpec(num_frames=16, tubelet=1), RAW).frames, video)
    uniform = read_clip(path, VideoSpec(num_frames=4, tubelet=1), RAW)  # segment centres: 2, 6, 10, 14
    assert np.array_equal(uniform.frames, video[[2, 6, 10, 14]])
    strided = read_clip(path, VideoSpec(num_frames=4, tubelet=1, sampling="strided", frame_stride=3), RAW)
    assert np.array_equal(strided.frames, video[[3, 6, 9, 12]])  # a window of 10 frames, centred
    # from bytes, as predict reads uploads
    assert np.array_equal(read_clip(path.read_bytes(), VideoSpec(num_frames=4, tubelet=1), RAW).frames, uniform.frames)


def test_sampling_indices() -> None:
    assert clip_indices(16, 4, "uniform").tolist() == [2, 6, 10, 14]
    assert clip_indices(10, 4, "strided", 3).tolist() == [0, 3, 6, 9]
    assert clip_indices(20, 4, "strided", 2).tolist() == [6, 8, 10, 12]
    # short videos: padded by repeating frames
    assert clip_indices(3, 6, "uniform").tolist() == [0, 0, 1, 1, 2, 2]
    assert clip_indices(5, 4, "strided", 2).tolist() == [0, 2, 4, 4]
    assert clip_indices(1, 3, "strided", 2).tolist() == [0, 0, 0]
    # jittered: one frame in each segment, a window anywhere, reproducible from the generator's seed
    for seed in range(20):
        rng = np.random.default_rng(seed)
        u = clip_indices(16, 4, "uniform", rng=rng)
        assert [i // 4 for i in u] == [0, 1, 2, 3]
        s = clip_indices(30, 4, "strided", 3, rng=rng)
        assert np.all(np.diff(s) == 3) and 0 <= s[0] <= 30 - 10
    draws = {tuple(clip_indices(16, 4, "uniform", rng=np.random.default_rng(s))) for s in range(20)}
    assert len(draws) > 10
    assert np.array_equal(
        clip_indices(16, 4, "uniform", rng=np.random.default_rng(7)),
        clip_indices(16, 4, "uniform", rng=np.random.default_rng(7)),
    )


def test_augmented_clips_crop_and_flip_every_frame_alike(tmp_path: Path) -> None:
    video = np.zeros((4, 32, 48, 3), np.uint8)
    video[:, :, :8] = 255  # a bright left edge in every frame
    path = write_video(tmp_path / "e.mkv", video)
    transform = ClipTransform(pil=None, size=16, augment=True, hflip=1.0, scale=(1.0, 1.0), ratio=(1.5, 1.5))
    rng = np.random.default_rng(0)
    clip = read_clip(path, VideoSpec(num_frames=4, tubelet=1), transform.for_clip(rng), rng)
    assert clip.frames.shape == (4, 16, 16, 3)
    assert all(np.array_equal(f, clip.frames[0]) for f in clip.frames)  # one crop and flip for the clip
    assert clip.frames[0, :, -1].mean() > 200 and clip.frames[0, :, 0].mean() < 50  # flipped: the edge is right


def test_spans_select_the_frames_between_start_and_end(tmp_path: Path) -> None:
    video = frames(16)  # 8 fps: frame k at k/8 s
    path = write_video(tmp_path / "s.mkv", video)
    clip = read_clip(path, VideoSpec(num_frames=4, tubelet=1), RAW, span=(1.0, 1.5))  # frames 8..11
    assert clip.total == 4 and np.array_equal(clip.frames, video[8:12])


def test_bad_videos_raise_naming_the_file(tmp_path: Path) -> None:
    video = VideoSpec(num_frames=4, tubelet=1)
    good = write_video(tmp_path / "good.mp4", frames(8))
    cases = {
        "garbage.mp4": b"this is not a video at all" * 10,
        "truncated.mp4": good.read_bytes()[:200],
        "empty.mkv": b"",
        "image.avi": (Path(__file__).parent / "test_vivit.py").read_bytes(),
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(DatasetError, match=name):
            read_clip(tmp_path / name, video, RAW)
    with pytest.raises(DatasetError, match="between 5 s and 6 s"):
        read_clip(good, video, RAW, span=(5.0, 6.0))
    with pytest.raises(VideoTooLong, match="at most 0.5 s"):
        read_clip(good, video, RAW, max_seconds=0.5)


def test_video_datasets(tmp_path: Path) -> None:
    write_motion(tmp_path / "m", 2, frames=4, size=32)
    folder = read_dataset(tmp_path / "m" / "train")
    assert folder.kind == "video" and len(folder) == 8 and folder.classes == ["down", "left", "right", "up"]
    manifest = tmp_path / "m" / "clips.csv"
    manifest.write_text("path,label,start,end\ntrain/up/up_0000.mp4,up,0,0.25\ntrain/left/left_0000.mp4,left,,\n")
    timed = read_dataset(manifest)
    assert timed.kind == "video" and timed.spans[0].tolist() == [0.0, 0.25] and np.isnan(timed.spans[1]).all()
    untimed = tmp_path / "m" / "plain.csv"
    untimed.write_text("path,label\ntrain/up/up_0000.mp4,up\ntrain/left/left_0000.mp4,left\n")
    assert read_dataset(untimed).fingerprint != timed.fingerprint and read_dataset(untimed).spans is None
    for text, why in [
        ("path,label,start\ntrain/up/up_0000.mp4,up,0\n", "both `start` and `end`"),
        ("path,label,start,end\ntrain/up/up_0000.mp4,up,2,1\ntrain/up/up_0001.mp4,down,,\n", "0 <= start < end"),
        ("path,label,start,end\ntrain/up/up_0000.mp4,up,a,1\ntrain/up/up_0001.mp4,down,,\n", "must both be seconds"),
    ]:
        manifest.write_text(text)
        with pytest.raises(DatasetError, match=why):
            read_dataset(manifest)
    shutil.copy(Path(__file__).parents[3] / "README.md", tmp_path / "m" / "train" / "up" / "notes.md")  # ignored
    (tmp_path / "m" / "train" / "up" / "frame.png").write_bytes(b"png")
    with pytest.raises(DatasetError, match=r"mixes images \(1\) and videos \(8\)"):
        read_dataset(tmp_path / "m" / "train")


def test_loader_processes_decode_the_same_clips_as_the_thread(tmp_path: Path) -> None:
    write_motion(tmp_path / "m", 2, frames=6, size=32)
    dataset = read_dataset(tmp_path / "m" / "train")
    video = VideoSpec(num_frames=4, tubelet=2)
    batches = [np.arange(0, 3), np.arange(3, 6), np.arange(6, 8)]
    transform = ClipTransform(pil=RAW)

    def load(workers: int) -> list[np.ndarray]:
        reader = ClipReader(dataset.paths, batches, transform, False, video)
        return [b.images.numpy() for b in iterate(reader, workers)]

    thread, processes = load(0), load(2)
    assert [b.shape for b in thread] == [(3, 4, 32, 32, 3), (3, 4, 32, 32, 3), (2, 4, 32, 32, 3)]
    assert all(np.array_equal(a, b) for a, b in zip(thread, processes, strict=True))
    # jittered with a seed: reproducible whatever the number of processes, and another seed draws other clips
    seeded = [ClipReader(dataset.paths, batches, transform, False, video, seed=s) for s in (1, 1, 2)]
    a, b, c = ([x.images.numpy() for x in iterate(r, w)] for r, w in zip(seeded, (0, 2, 0), strict=True))
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_jobs_fail_on_a_corrupt_video_or_skip_it_and_pad_short_ones(tmp_path: Path) -> None:
    write_motion(tmp_path / "m", 3, frames=8, size=32)
    root = tmp_path / "m" / "train"
    (root / "up" / "up_bad.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 but then nothing")
    write_video(root / "down" / "down_short.mp4", frames(2, 32, 32))
    settings = Settings(data_dir=tmp_path / "data", allowed_roots=[tmp_path], device="cpu")

    def spec(on_corrupt: str) -> JobSpec:
        return JobSpec.model_validate(
            {
                "dataset": {"path": str(root), "on_corrupt": on_corrupt},
                "backbone": {"name": "test_vit", "pretrained": False, "image_size": 32, "video": {"num_frames": 4}},
                "method": {"name": "linear"},
            }
        )

    with pytest.raises(DatasetError, match="up_bad.mp4: not a readable video"):
        run_extraction(spec("fail"), settings, NullReporter())
    reporter = NullReporter()
    summary = run_extraction(spec("skip"), settings, reporter)
    assert summary["skipped"] == [str(root / "up" / "up_bad.mp4")]
    warnings = [e["message"] for e in reporter.events if e["level"] == "warning"]
    assert any("skipped a corrupt video" in m and "up_bad.mp4" in m for m in warnings)
    assert any(
        "down_short.mp4: 2 frames, fewer than the 4 a clip needs; padded by repeating frames" in m for m in warnings
    )

    # online (no cache): the training loaders meet them, and the job's events say so too
    online = JobSpec.model_validate(
        {
            **spec("skip").model_dump(),
            "execution": {"mode": "online"},
            "method": {"name": "losa", "rank": 2, "layers": 1},
            "training": {"epochs": 1},
        }
    )
    reporter = NullReporter()
    train_job(online, settings, None, reporter, tmp_path / "ckpt")
    warnings = [e["message"] for e in reporter.events if e["level"] == "warning"]
    assert any("skipped 1 unreadable file(s) while training" in m and "up_bad.mp4" in m for m in warnings), warnings
    assert any(
        "down_short.mp4: 2 frames, fewer than the 4 a clip needs; padded by repeating frames" in m for m in warnings
    ), warnings
