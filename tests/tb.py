"""Read TensorBoard event files back in tests."""

from __future__ import annotations

from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.util import tensor_util


def load_events(logdir: str | Path) -> EventAccumulator:
    """An EventAccumulator over the single run in ``logdir`` with nothing sampled away."""
    files = sorted(Path(logdir).rglob("events.out.tfevents.*"))
    assert files, f"no event files under {logdir}"
    accumulator = EventAccumulator(str(files[0].parent), size_guidance={"scalars": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def scalar_series(accumulator: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(event.step, event.value) for event in accumulator.Scalars(tag)]


def custom_scalars_layout(accumulator: EventAccumulator) -> layout_pb2.Layout:
    events = accumulator.Tensors("custom_scalars__config__")
    raw = tensor_util.make_ndarray(events[-1].tensor_proto).item()
    return layout_pb2.Layout.FromString(raw)


def texts(accumulator: EventAccumulator, tag: str) -> list[tuple[int, str]]:
    tags = accumulator.Tags()["tensors"]
    name = f"{tag}/text_summary"
    if name not in tags:
        return []
    out = []
    for event in accumulator.Tensors(name):
        value = tensor_util.make_ndarray(event.tensor_proto)
        out.append((event.step, value.item().decode() if hasattr(value, "item") else str(value)))
    return out
