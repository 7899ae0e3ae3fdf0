"""Streaming propagation: buffer contents, objects added mid-way and removed, constant memory, errors."""
from __future__ import annotations

import gc

import numpy as np
import pytest
import torch

from sst_triton.nn import KVCache

from models import SST, Propagator

H, W = 30, 34  # no multiple of the stride: padded and cropped inside


def moving_squares(T=30, seed=0):
    """``(T, 3, H, W)`` frames and ``(T, H, W)`` ids: square 1 moves right from frame 0,
    square 2 enters at frame 10 and moves down."""
    g = torch.Generator().manual_seed(seed)
    background = torch.rand(3, H, W, generator=g) * 0.3
    frames = background.expand(T, 3, H, W).clone()
    masks = torch.zeros(T, H, W, dtype=torch.long)
    for t in range(T):
        x = t % (W - 8)
        masks[t, 4:12, x:x + 8] = 1
        if t >= 10:
            y = (t - 10) % (H - 8)
            masks[t, y:y + 8, 20:28] = 2
    frames[:, 0][masks == 1] = 0.9
    frames[:, 2][masks == 2] = 0.9
    return frames, masks


def held_tensors(root) -> int:
    """Tensors reachable from ``root``: what it keeps alive, whatever the rest of the
    process holds (a global count also sees other tests' garbage and library caches)."""
    seen, stack, count = {id(root)}, [root], 0
    while stack:
        obj = stack.pop()
        # type(), not isinstance: some module objects warn when their class is asked
        if issubclass(type(obj), torch.Tensor):
            count += 1
            continue
        for ref in gc.get_referents(obj):
            if id(ref) not in seen and not isinstance(ref, type):
                seen.add(id(ref))
                stack.append(ref)
    return count


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return SST(attn="local").eval()


def test_thirty_frames_object_added_at_frame_ten_constant_memory(model):
    frames, masks = moving_squares()
    prop = Propagator(model, tau=3)
    yv_mask = torch.where(masks[10] == 2, 2, 0)  # YouTube-VOS: the new object's mask only
    sizes, tensors = [], []
    for t in range(30):
        if t == 0:
            probs = prop.step(frames[t], torch.where(masks[0] == 1, 1, 0))
        elif t == 10:
            probs = prop.step(frames[t], yv_mask, objects=[2])
        else:
            probs = prop.step(frames[t])
        K = 1 if t < 10 else 2
        assert probs.shape == (K + 1, H, W)
        assert prop.objects == ([1] if t < 10 else [1, 2])
        torch.testing.assert_close(probs.sum(dim=0), torch.ones(H, W))
        assert len(prop.buffer) == min(t + 1, 3)
        if t == 0:
            assert torch.equal(probs.argmax(0), masks[0])
        if t == 10:
            # the annotation wins over the prediction on its pixels
            assert bool((probs[2][masks[10] == 2] == 1).all())
            assert bool((probs[2][masks[10] != 2] == 0).all())
        if t >= 12:
            sizes.append(prop.buffer_bytes())
        if t in (12, 29):
            tensors.append(held_tensors(prop))
    # keep_first: the first frame stays, then the most recent ones
    assert [e.index for e in prop.buffer] == [0, 28, 29]
    # memory does not grow with the length of the video
    assert len(set(sizes)) == 1, sizes
    assert len(set(tensors)) == 1, tensors


def test_step_matches_the_model_on_the_buffer(model):
    # an independent path: the model's own forward on the frames the buffer should hold,
    # with the labels the propagator predicted for them
    frames, masks = moving_squares(T=8)
    prop = Propagator(model, tau=3, keep_first=True)
    predicted, outputs = [], []
    for t in range(8):
        probs = prop.step(frames[t], masks[0] if t == 0 else None)
        predicted.append(probs.argmax(0))
        outputs.append(probs)
    for t in (1, 2, 5, 7):
        ref = [0] + list(range(max(1, t - 2), t))
        video = frames[ref + [t]][None]
        labels = torch.stack([predicted[i] for i in ref])[None]
        with torch.no_grad():
            expected = model(video, labels, num_objects=2)[0].softmax(0)
        torch.testing.assert_close(outputs[t], expected, rtol=1e-4, atol=1e-5)


def test_without_keep_first_the_buffer_slides(model):
    frames, masks = moving_squares(T=6)
    prop = Propagator(model, tau=2, keep_first=False)
    calls = []
    hook = model.backbone.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
    try:
        for t in range(6):
            prop.step(frames[t], masks[0] if t == 0 else None)
    finally:
        hook.remove()
    assert [e.index for e in prop.buffer] == [4, 5]
    # buffered frames keep their embeddings: one backbone pass of one frame per step
    assert calls == [1] * 6


def test_tau_one_with_keep_first_matches_against_the_first_frame_only(model):
    frames, masks = moving_squares(T=4)
    prop = Propagator(model, tau=1, keep_first=True)
    for t in range(4):
        prop.step(frames[t], masks[0] if t == 0 else None)
    assert [e.index for e in prop.buffer] == [0]


def test_remove_an_object(model):
    frames, masks = moving_squares(T=11)
    prop = Propagator(model, tau=3)
    prop.step(frames[0], masks[0])
    prop.step(frames[1], masks[10], objects=[2])
    prop.step(frames[2])
    prop.remove(1)
    assert prop.objects == [2]
    # the removed object's cells are background now; object 2 moved to channel 1
    assert all(int(e.labels.max()) <= 1 for e in prop.buffer)
    assert bool((prop.buffer[1].labels == 1).any())
    probs = prop.step(frames[3])
    assert probs.shape == (2, H, W)
    with pytest.raises(ValueError, match="not tracked"):
        prop.remove(1)


def test_segment_video_helper(model):
    frames, masks = moving_squares(T=11)
    frames = frames[[0, 1, 2, 3, 10]]
    annotations = {1: masks[1].numpy().astype(np.uint8), 3: (masks[10], [2])}
    ids = Propagator(model, tau=3).segment_video(frames, annotations)
    assert ids.shape == (5, H, W) and ids.dtype == torch.long
    assert bool((ids[0] == 0).all())  # before the first annotation: background
    assert torch.equal(ids[1], masks[1])
    assert bool((ids[3][masks[10] == 2] == 2).all())
    assert set(ids.unique().tolist()) <= {0, 1, 2}


def test_errors(model):
    frames, masks = moving_squares(T=3)
    prop = Propagator(model)
    with pytest.raises(ValueError, match="no object"):
        prop.step(frames[0])
    with pytest.raises(ValueError, match="mask has shape"):
        prop.step(frames[0], masks[0][:, :-1])
    with pytest.raises(TypeError, match="integer"):
        prop.step(frames[0], masks[0].float())
    with pytest.raises(ValueError, match=">= 0"):
        prop.step(frames[0], masks[0] - 1)
    with pytest.raises(ValueError, match="object 3"):
        prop.step(frames[0], masks[0], objects=[3])
    with pytest.raises(ValueError, match="positive"):
        prop.step(frames[0], masks[0], objects=[0])
    with pytest.raises(ValueError, match="without a mask"):
        prop.step(frames[0], objects=[1])
    with pytest.raises(ValueError, match=r"frame must have shape"):
        prop.step(frames[0][:2], masks[0])
    prop.step(frames[0], masks[0])
    with pytest.raises(ValueError, match="size"):
        prop.step(frames[1][:, :-2])
    with pytest.raises(ValueError, match="tau"):
        Propagator(model, tau=0)
    with pytest.raises(TypeError, match="SST"):
        Propagator(torch.nn.Linear(2, 2))


# -- a streaming model: every layer's keys/values of the buffer frames cached -----------------


@pytest.fixture(scope="module")
def streaming_model():
    torch.manual_seed(0)
    return SST(attn="strided", dim=24, heads=2, decoder_dim=8, backbone_width=8, stride=(1, 2, 2),
               streaming=True).eval()


def test_streaming_steps_equal_the_causal_model_while_nothing_is_evicted(streaming_model):
    model = streaming_model
    frames, masks = moving_squares(T=4)
    prop = Propagator(model, tau=3, keep_first=True)  # frames 0, 1, 2 are all buffered at step 3
    predicted, outputs = [], []
    for t in range(4):
        probs = prop.step(frames[t], masks[0] if t == 0 else None)
        predicted.append(probs.argmax(0))
        outputs.append(probs)
    for t in (1, 2, 3):
        # the causal model on the whole clip 0..t, with the labels the propagator predicted
        video, labels = frames[:t + 1][None], torch.stack(predicted[:t])[None]
        with torch.no_grad():
            expected = model(video, labels, num_objects=2)[0].softmax(0)
        torch.testing.assert_close(outputs[t], expected, rtol=1e-5, atol=1e-6)


class CachedFrames:
    """A forward pre-hook that records how many cached frames each attention call is given (an
    object, not a closure: held_tensors must not walk into the test module's globals)."""

    def __init__(self) -> None:
        self.counts: list[int] = []

    def __call__(self, module, args, kwargs) -> None:
        self.counts.append(0 if kwargs["cache"] is None else kwargs["cache"].k.shape[2])


def test_streaming_evicts_keys_and_values_with_their_frames(streaming_model):
    model = streaming_model
    frames, masks = moving_squares(T=30)
    prop = Propagator(model, tau=3)
    key_frames = CachedFrames()
    hook = model.encoder.layers[-1].attn.register_forward_pre_hook(key_frames, with_kwargs=True)
    sizes, tensors = [], []
    try:
        for t in range(30):
            if t == 0:
                prop.step(frames[t], torch.where(masks[0] == 1, 1, 0))
                first_kv = [(kv.k.clone(), kv.v.clone()) for kv in prop.buffer[0].kv]
            elif t == 10:
                prop.step(frames[t], torch.where(masks[10] == 2, 2, 0), objects=[2])
            else:
                probs = prop.step(frames[t])
                torch.testing.assert_close(probs.sum(dim=0), torch.ones(H, W))
            if t >= 12:
                sizes.append(prop.buffer_bytes())
            if t in (12, 29):
                tensors.append(held_tensors(prop))
    finally:
        hook.remove()
    # every step attends to the buffer only: 0, 1, 2, then 3 cached frames for good
    assert key_frames.counts == [0, 1, 2] + [3] * 27
    assert [e.index for e in prop.buffer] == [0, 28, 29] and prop.objects == [1, 2]
    # the first frame's keys/values are kept as computed; the buffer holds no embedding
    for (k, v), kv in zip(first_kv, prop.buffer[0].kv):
        assert torch.equal(k, kv.k) and torch.equal(v, kv.v)
    assert all(e.embedding is None and len(e.kv) == model.encoder.depth for e in prop.buffer)
    assert len(set(sizes)) == 1 and len(set(tensors)) == 1, (sizes, tensors)
    prop.remove(1)
    assert prop.step(frames[0]).shape == (2, H, W)


def test_streaming_step_after_eviction_reads_the_buffers_caches(streaming_model):
    # past the first eviction, the step is the model's streaming step on exactly the first
    # frame's and the recent frames' cached keys/values (frame 1's are gone)
    model = streaming_model
    frames, masks = moving_squares(T=5)
    prop = Propagator(model, tau=3)
    for t in range(4):
        prop.step(frames[t], masks[0] if t == 0 else None)
    buffer = prop.buffer
    assert [e.index for e in buffer] == [0, 2, 3]
    labels = torch.stack([e.labels for e in buffer] + [torch.full_like(buffer[0].labels, -1)])[None]
    caches = [KVCache(torch.cat([e.kv[i].k for e in buffer], 2), torch.cat([e.kv[i].v for e in buffer], 2))
              for i in range(model.encoder.depth)]
    Hp, Wp = model.pad_size(H, W)
    padded = torch.nn.functional.pad(frames[4][None], (0, Wp - W, 0, Hp - H), mode="replicate")
    with torch.no_grad():
        embedding, skips, _ = model.extract(padded)
        logits, _ = model.segment_newest(embedding, 4, caches, labels, skips, 2, (Hp, Wp))
    torch.testing.assert_close(prop.step(frames[4]), logits[0, :, :H, :W].softmax(0), rtol=1e-5, atol=1e-6)


def test_streaming_buffer_limits(streaming_model):
    # the ring time code tells tau + 1 = 4 frames after the first apart
    Propagator(streaming_model, tau=4, keep_first=True)
    Propagator(streaming_model, tau=3, keep_first=False)
    with pytest.raises(ValueError, match="tau must be <= 4"):
        Propagator(streaming_model, tau=5, keep_first=True)
    with pytest.raises(ValueError, match="tau must be <= 3"):
        Propagator(streaming_model, tau=4, keep_first=False)


def test_a_checkpoint_written_before_streaming_existed_loads_and_runs_as_before(tmp_path, model):
    from vos.checkpoint import load_model, save_checkpoint
    from vos.config import RunConfig

    config = RunConfig().to_dict()
    config["model"].update({k: v for k, v in model.config.items() if k in config["model"]})
    config["model"]["kernel_size"] = list(config["model"]["kernel_size"])
    del config["model"]["streaming"]  # the key did not exist
    save_checkpoint(tmp_path / "ckpt.pt", {"model": model.state_dict(), "config": config})
    loaded, cfg = load_model(tmp_path / "ckpt.pt")
    assert cfg.model.streaming is False and loaded.streaming is False
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())
    frames, masks = moving_squares(T=6)
    ids = Propagator(loaded).segment_video(frames, {0: masks[0]})
    assert torch.equal(ids, Propagator(model).segment_video(frames, {0: masks[0]}))
