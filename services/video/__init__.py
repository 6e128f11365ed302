"""Video: clips decoded with PyAV, an unfactorised ViViT built around a timm image ViT, and what they share. The
rest of the code reaches them through the video modality (services/modality/video.py).

- `spec.py`: `backbone.video` (frames, tubelet, init, sampling), torch-free so the API validates it;
- `sampling.py`: which frames of a video make its clip (deterministic for the cache, jittered online);
- `decoding.py`: a clip as uint8 frames [T, H, W, 3], decoded by PyAV and put through the frames' transform;
- `loading.py`: `ClipReader`, a batch of clips per item for the loader processes of services/data/loading.py;
- `backbone.py`: the tubelet embedding and the ViViT made of a timm VisionTransformer;
- `synthetic.py`: the motion dataset of the demo, tests and benchmark.

Importing this package imports nothing heavy; each module imports what it needs.
"""
