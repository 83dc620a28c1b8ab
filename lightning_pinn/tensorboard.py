"""The TensorBoard custom-scalars layout that groups lightning-pinn's charts.

Open TensorBoard's *Custom Scalars* tab to see, in one place, the per-term gradient norms,
the imbalance ratio against its alarm threshold, the losses, the weights, the gradient
cosines and the alarm flags.
"""

from __future__ import annotations

import re
import struct
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "LAYOUT_CATEGORY",
    "c_crc32c",
    "dashboard_layout",
    "fast_event_checksums",
    "layout_written_by_others",
    "losses_in_layout",
    "terms_in_layout",
    "write_layout",
]

#: Name of the custom-scalars category lightning-pinn writes.
LAYOUT_CATEGORY = "lightning-pinn"


_MASK_DELTA = 0xA282EAD8  # TFRecord's checksum mask: rotate right by 15 bits, add this constant


def c_crc32c() -> Callable[[bytes], int] | None:
    """google-crc32c's C function ``value`` (the CRC-32C of bytes), or ``None`` where it is not
    installed or has no C build (its pure-Python fallback, which warns when imported, is slower
    than TensorBoard's own and is not used)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # "using a pure python implementation"
            import google_crc32c
    except ImportError:  # a dependency, but the dashboard works without it
        return None
    return google_crc32c.value if getattr(google_crc32c, "implementation", None) == "c" else None


def _masked_crc32c_in_c(data: bytes) -> int:
    """TFRecord's masked CRC-32C of ``data`` (any bytes-like object, as TensorBoard's own function
    takes), computed by google-crc32c's C code."""
    assert _crc32c_value is not None
    crc = _crc32c_value(data if type(data) is bytes else bytes(data))
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def fast_event_checksums() -> bool:
    """Make TensorBoard's event writer checksum its records in C; returns whether it does.

    Without TensorFlow installed, TensorBoard computes the masked CRC-32C of every event record
    in pure Python, in its writer thread but holding the GIL that training needs: measured here,
    0.05 ms for a 2-term measurement's event and 3.3 ms for a 30-term one (36 kB, most of it the
    435 pair cosines), against 1.5 µs for google-crc32c's C implementation of the same function.
    The swap replaces one function of ``tensorboard.summary.writer.record_writer`` for the whole
    process, once, and only when google-crc32c has its C implementation and agrees with
    TensorBoard's own function on a sample; the bytes written are identical either way.
    """
    global _crc32c_value
    try:
        from tensorboard.summary.writer import record_writer
    except ImportError:
        return False
    current = record_writer.masked_crc32c
    if current is _masked_crc32c_in_c:
        return True
    value = c_crc32c()
    if value is None or getattr(current, "__module__", "") != _PURE_PYTHON_CRC_MODULE:
        return False  # no C code to gain, or someone else already replaced it: leave it alone
    _crc32c_value = value
    sample = bytes(range(256)) * 3 + b"lightning-pinn"
    if current(sample) != _masked_crc32c_in_c(sample) or current(b"") != _masked_crc32c_in_c(b""):
        return False
    record_writer.masked_crc32c = _masked_crc32c_in_c
    return True


#: Where TensorBoard's pure-Python ``masked_crc32c`` lives (TensorFlow's stub).
_PURE_PYTHON_CRC_MODULE = "tensorboard.compat.tensorflow_stub.pywrap_tensorflow"
_crc32c_value: Callable[[bytes], int] | None = None  # google-crc32c's C function, once swapped in


def dashboard_layout(prefix: str = "", logger_prefix: str = "", terms: Sequence[str] | None = None) -> dict[str, dict[str, list[Any]]]:
    """The layout passed to ``SummaryWriter.add_custom_scalars`` (tag regexes, one chart each).

    ``prefix`` is a loss's tag prefix (``"<loss path>/"`` when a module holds several
    ``MultiTermLoss``); each loss then gets its own category. ``logger_prefix`` is what the
    logger puts before every tag (``"train-"`` for ``TensorBoardLogger(prefix="train")``).
    ``terms``, the loss's term names, keep the loss and weight charts to those terms (a module's
    own ``self.log("loss/total")`` shares the ``loss/`` family).
    """
    p = re.escape(logger_prefix + prefix)
    names = f"(?:{'|'.join(re.escape(t) for t in terms)})$" if terms else ""
    category = f"{LAYOUT_CATEGORY} ({prefix.rstrip('/')})" if prefix else LAYOUT_CATEGORY
    return {
        category: {
            "gradient norm per term  ‖∇θ L_i‖": ["Multiline", [rf"^{p}grad_norm/"]],
            "weighted gradient norm per term  λ_i‖∇θ L_i‖": ["Multiline", [rf"^{p}grad_norm_weighted/"]],
            "gradient-norm ratio (max/min weighted) vs alarm threshold": [
                "Multiline",
                [rf"^{p}grad_ratio$", rf"^{p}grad_ratio_threshold$"],
            ],
            "loss per term  L_i (unweighted)": ["Multiline", [rf"^{p}loss/{names}"]],
            "weight per term  λ_i": ["Multiline", [rf"^{p}weight/{names}"]],
            "gradient cosine per pair": ["Multiline", [rf"^{p}grad_cosine/"]],
            "alarms (1 = on)": ["Multiline", [rf"^{p}alarm/"]],
        }
    }


def write_layout(writer: Any, prefix: str = "", logger_prefix: str = "", terms: Sequence[str] | None = None) -> bool:
    """Write the layout to a ``SummaryWriter``: once per writer, prefix and terms, and again when
    the run's last layout no longer shows lightning-pinn's categories (someone wrote another).

    TensorBoard shows only the last layout of a run, so the layout written holds every loss's
    category seen so far and the categories of the last layout someone else (the user's own
    dashboard) wrote to the run: see :func:`layout_written_by_others`. Returns False when the
    run's last layout still lacks lightning-pinn's categories after writing (a layout in another
    writer's event file, which TensorBoard reads after this writer's, hides them), else True.
    """
    written: dict[tuple[str, str], tuple[str, ...] | None] = getattr(writer, "_lightning_pinn_layouts", {})
    key, names = (prefix, logger_prefix), tuple(terms) if terms is not None else None
    changed = key not in written or written[key] != names
    written[key] = names
    writer._lightning_pinn_layouts = written
    ours: dict[str, dict[str, list[Any]]] = {}
    for (each, each_logger), each_terms in sorted(written.items(), key=lambda item: item[0]):
        ours.update(dashboard_layout(each, each_logger, each_terms))
    last = _last_layout_in_run(writer)
    if not changed and (last is None or _shows(last, ours)):
        return True  # shown (or unreadable: then written once, as without the read-back)
    writer.add_custom_scalars({**_foreign_categories(last), **ours})
    after = _last_layout_in_run(writer)
    return after is None or _shows(after, ours)


def _is_ours(title: str) -> bool:
    """Whether a category title is one :func:`dashboard_layout` writes."""
    return title == LAYOUT_CATEGORY or (title.startswith(f"{LAYOUT_CATEGORY} (") and title.endswith(")"))


def _shows(last: list[tuple[str, Any]], categories: dict[str, Any]) -> bool:
    """Whether the layout ``last`` holds every one of ``categories``' titles."""
    return set(categories) <= {title for title, _ in last}


#: The tag under which TensorBoard's custom-scalars plugin stores a run's layout.
_LAYOUT_TAG = b"custom_scalars__config__"
#: Records longer than this are skipped unread: a layout is a few kB, images and histograms are not.
_LARGEST_LAYOUT_RECORD = 1 << 20
_CHUNK = 1 << 20


def layout_written_by_others(writer: Any) -> dict[str, dict[str, list[Any]]]:
    """The categories that are not lightning-pinn's in the last custom-scalars layout of the
    writer's run folder, in the ``add_custom_scalars`` form (``{category: {chart: [kind, tags]}}``).

    TensorBoard shows only the last layout of a run (the last in its event files sorted by name,
    then in file order), so the layout lightning-pinn writes repeats them, or the user's own
    dashboard would disappear. A margin chart with several series becomes one chart per series
    (the ``add_custom_scalars`` form holds one). Nothing is found where the writer has no
    readable local folder: reading never fails a fit.
    """
    return _foreign_categories(_last_layout_in_run(writer))


def _foreign_categories(categories: list[tuple[str, Any]] | None) -> dict[str, dict[str, list[Any]]]:
    found: dict[str, dict[str, list[Any]]] = {}
    for title, category in categories or []:
        if _is_ours(title):
            continue
        charts = found.setdefault(title, {})
        for chart in category.chart:
            if chart.HasField("margin"):
                entries = [["Margin", [s.value, s.lower, s.upper]] for s in chart.margin.series]
            else:
                entries = [["Multiline", list(chart.multiline.tag)]]
            for entry in entries:
                name, number = chart.title, 1
                while name in charts:  # a second chart or series under one title keeps its own chart
                    number += 1
                    name = f"{chart.title} ({number})"
                charts[name] = entry
    return found


def _last_layout_in_run(writer: Any) -> list[tuple[str, Any]] | None:
    """``[(category title, Category proto)]`` of the run's last layout (TensorBoard's order: event
    files sorted by name, then records in file order), or None.

    Reads incrementally (the writer remembers how far each file was read), in bounded chunks,
    skipping records too long to be a layout and parsing only those that hold the layout tag, so
    a later call costs a pass over what was written since.
    """
    try:
        from tensorboard.plugins.custom_scalar import layout_pb2

        writer.flush()
        log_dir = Path(writer.get_logdir() if hasattr(writer, "get_logdir") else writer.logdir)
        read_to: dict[str, int] = writer.__dict__.setdefault("_lightning_pinn_read_to", {})
        last: tuple[tuple[str, int], bytes] | None = writer.__dict__.get("_lightning_pinn_last_layout")
        for path in sorted(log_dir.glob("*tfevents*")):
            found, read_to[path.name] = _layouts_in(path, read_to.get(path.name, 0))
            if found is not None and (last is None or (path.name, found[0]) > last[0]):
                last = ((path.name, found[0]), found[1])
        writer._lightning_pinn_last_layout = last
        if last is None:
            return None
        return [(category.title, category) for category in layout_pb2.Layout.FromString(last[1]).category]
    except Exception:  # an unreadable folder or event must not stop a fit: the layout is then ours alone
        return None


def _layouts_in(path: Path, start: int) -> tuple[tuple[int, bytes] | None, int]:
    """(offset, serialized layout) of the last layout in the complete records of an event file
    from byte ``start`` (None if there is none), and the offset after those records.

    The framing is TFRecord's: an 8-byte little-endian length, its 4-byte CRC, the record, the
    record's 4-byte CRC. A record still being written is left for the next call.
    """
    from tensorboard.compat.proto import event_pb2

    last: tuple[int, bytes] | None = None
    size = path.stat().st_size
    offset = start
    with path.open("rb") as file:
        while offset + 12 <= size:
            file.seek(offset)
            chunk = file.read(_CHUNK)
            position = 0
            while position + 12 <= len(chunk):
                (length,) = struct.unpack_from("<Q", chunk, position)
                end = position + 12 + length + 4
                if offset + end > size:
                    return last, offset + position  # incomplete: read it next time
                if end > len(chunk):
                    if position > 0:
                        break  # read the next chunk from this record on
                    if length <= _LARGEST_LAYOUT_RECORD:  # one record longer than a chunk
                        file.seek(offset + 12)
                        record = file.read(length)
                        if _LAYOUT_TAG in record:
                            last = _layout_of(event_pb2.Event.FromString(record), offset) or last
                    position = end
                    break
                if length <= _LARGEST_LAYOUT_RECORD and chunk.find(_LAYOUT_TAG, position + 12, end - 4) >= 0:
                    last = _layout_of(event_pb2.Event.FromString(chunk[position + 12 : end - 4]), offset + position) or last
                position = end
            offset += position
    return last, offset


def _layout_of(event: Any, offset: int) -> tuple[int, bytes] | None:
    for value in event.summary.value:
        if value.tag == _LAYOUT_TAG.decode() and value.tensor.string_val:
            return offset, value.tensor.string_val[0]
    return None


def _alternatives(pattern: str) -> list[str]:
    """Split ``a|b|c`` at the ``|`` that are not escaped (``\\|`` is a name's ``|``; ``\\\\`` a
    name's backslash, so the ``|`` after it does separate)."""
    parts, current, index = [], "", 0
    while index < len(pattern):
        if pattern[index] == "\\" and index + 1 < len(pattern):
            current += pattern[index : index + 2]
            index += 2
        elif pattern[index] == "|":
            parts.append(current)
            current, index = "", index + 1
        else:
            current += pattern[index]
            index += 1
    return [*parts, current]


def _unescape(escaped: str) -> str:
    """Undo :func:`re.escape` (as :func:`dashboard_layout` applied it to prefixes and term names)."""
    return re.sub(r"\\(.)", r"\1", escaped)


def terms_in_layout(categories: list[tuple[str, list[str]]]) -> dict[str, list[str]]:
    """``{tag prefix: the loss's term names}`` read back from a written layout (``categories``
    holds each category's title and all its charts' tag regexes): the names
    :func:`dashboard_layout` put in the weight chart's ``^<prefix>weight/(?:a|b)$``. Layouts
    written without term names give nothing."""
    found: dict[str, list[str]] = {}
    for title, patterns in categories:
        if not _is_ours(title):
            continue
        for pattern in patterns:
            match = re.fullmatch(r"\^(.*)weight/\(\?:(.*)\)\$", pattern)
            if match:
                found[_unescape(match.group(1))] = [_unescape(name) for name in _alternatives(match.group(2))]
    return found


def losses_in_layout(categories: list[tuple[str, str]]) -> dict[str, str]:
    """``{tag prefix: loss path}`` read back from a written layout, the inverse of
    :func:`dashboard_layout`: ``categories`` holds each category's title and its first chart's
    first tag regex (``"^<escaped logger and loss prefix>grad_norm/"``). Other categories are
    skipped. The layout gives the exact split between a logger's prefix and a loss path, which
    the tags alone leave ambiguous when a path holds a ``-``."""
    found: dict[str, str] = {}
    for title, pattern in categories:
        if _is_ours(title) and pattern.startswith("^") and pattern.endswith("grad_norm/"):
            prefix = _unescape(pattern[1 : -len("grad_norm/")])
            found[prefix] = title[len(LAYOUT_CATEGORY) :].strip().removeprefix("(").removesuffix(")")
    return found
