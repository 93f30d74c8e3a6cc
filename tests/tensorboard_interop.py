"""The Python side of the TensorBoard interop tests (tests/session/test_tensorboard.cpp,
[tensorboard]): the real `tensorboard` package reads the event files the C++ tests write.

  tensorboard_interop.py read DIR...   loads each DIR as `tensorboard --logdir DIR` does, and
                                       prints, as one JSON object keyed by DIR, what it holds:
    {"scalars": {tag: [[step, float32 bits, wall_time]...]},
     "texts": {tag: [[step, text, wall_time]...]},
     "legacy_scalars": {tag: [[step, float32 bits, wall_time]...]}}
"scalars" and "texts" come from plugin_event_accumulator.EventAccumulator, what TensorBoard's
Python server reads with; "legacy_scalars" from event_accumulator.EventAccumulator, what scripts
use to read scalars. Both purge orphaned data (SessionLog START). A value is given by the bits of
its float32 (NaN is not JSON), for the C++ side to compare exactly.
"""
import json
import logging
import struct
import sys

from tensorboard.backend.event_processing import event_accumulator
from tensorboard.backend.event_processing import plugin_event_accumulator
from tensorboard.util import tensor_util


def bits(value):
    return struct.unpack("<I", struct.pack("<f", value))[0]


def read(directory):
    board = plugin_event_accumulator.EventAccumulator(
        directory, size_guidance={plugin_event_accumulator.TENSORS: 0})
    board.Reload()
    scalars = {
        tag: [[e.step, bits(tensor_util.make_ndarray(e.tensor_proto).item()), e.wall_time]
              for e in board.Tensors(tag)]
        for tag in board.PluginTagToContent("scalars")} if "scalars" in board.ActivePlugins() else {}
    texts = {
        tag: [[e.step, e.tensor_proto.string_val[0].decode(), e.wall_time]
              for e in board.Tensors(tag)]
        for tag in board.PluginTagToContent("text")} if "text" in board.ActivePlugins() else {}
    legacy = event_accumulator.EventAccumulator(
        directory, size_guidance={event_accumulator.SCALARS: 0})
    legacy.Reload()
    legacy_scalars = {tag: [[e.step, bits(e.value), e.wall_time] for e in legacy.Scalars(tag)]
                      for tag in legacy.Tags()[event_accumulator.SCALARS]}
    return {"scalars": scalars, "texts": texts, "legacy_scalars": legacy_scalars}


def main():
    if len(sys.argv) < 3 or sys.argv[1] != "read":
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    logging.disable(logging.WARNING)  # a torn last record is expected in some tests
    print(json.dumps({directory: read(directory) for directory in sys.argv[2:]}))


if __name__ == "__main__":
    main()
