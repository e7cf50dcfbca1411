"""A ROS 2 node that answers questions about a camera stream with a tops-export model.

    python examples/ros2_node.py out/shapes --image-topic /camera/image_raw --keep 64
    ros2 topic pub --once /vlm/query std_msgs/msg/String "{data: 'What shape is the red object?'}"
    ros2 topic echo /vlm/answer

It subscribes to a sensor_msgs/Image topic (it keeps the latest frame) and a std_msgs/String query
topic, and publishes each answer, about the latest frame, as a std_msgs/String. The frame goes to
the Python API as an HxWx3 uint8 array, straight from the message's buffer: no JPEG round trip.
Images and queries are handled in two callback groups of a multi-threaded executor, so frames keep
arriving while a question is answered (one Pipeline is safe to share between threads).

ROS 2 is not a dependency of tops-edge: rclpy is imported inside main(), so `VlmBridge`, the
callbacks' logic, runs (and is tested) without it. Arguments after `--ros-args` go to ROS.
"""

from __future__ import annotations

import argparse
import sys
import threading

import numpy as np

#: sensor_msgs/Image encodings this node reads: (channels, the channels' order as RGB)
ENCODINGS = {"rgb8": (3, (0, 1, 2)), "bgr8": (3, (2, 1, 0)), "rgba8": (4, (0, 1, 2)), "bgra8": (4, (2, 1, 0)),
             "mono8": (1, (0, 0, 0))}


def image_to_rgb(msg) -> np.ndarray:
    """A sensor_msgs/Image as an HxWx3 uint8 RGB array (rows may be padded: `step` bytes each)."""
    encoding = str(msg.encoding).lower()
    if encoding not in ENCODINGS:
        raise ValueError(f"image encoding '{msg.encoding}' is not one of {', '.join(ENCODINGS)}")
    channels, order = ENCODINGS[encoding]
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    data = np.frombuffer(msg.data, dtype=np.uint8)
    if step < width * channels or data.size < step * height:
        raise ValueError(f"a {height}x{width} {encoding} image with rows of {step} bytes needs {step * height} bytes, "
                         f"the message has {data.size}")
    rows = data[: step * height].reshape(height, step)[:, : width * channels]
    return np.ascontiguousarray(rows.reshape(height, width, channels)[..., list(order)])  # a copy: ours to keep


class VlmBridge:
    """The node's logic: `on_image` keeps the latest frame, `on_query` answers a question about it
    with `pipe.generate(frame, question, **options)` and hands the text to `publish`. Problems go to
    `log` (a frame of an unknown encoding, a question before any frame, a question the model refuses)."""

    def __init__(self, pipe, publish, log, **options):
        self.pipe, self.publish, self.log, self.options = pipe, publish, log, options
        self._frame: np.ndarray | None = None
        self._lock = threading.Lock()

    def on_image(self, msg) -> None:
        try:
            frame = image_to_rgb(msg)
        except ValueError as exc:
            self.log(f"ignored a frame: {exc}")
            return
        with self._lock:
            self._frame = frame

    def latest_frame(self) -> np.ndarray | None:
        with self._lock:
            return self._frame

    def on_query(self, msg) -> None:
        from tops_edge.errors import TopsError

        question = str(msg.data).strip()
        if not question:
            self.log("ignored an empty question")
            return
        frame = self.latest_frame()
        if frame is None:
            self.log(f"no image received yet; cannot answer {question!r}")
            return
        try:
            result = self.pipe.generate(frame, question, **self.options)
        except TopsError as exc:
            self.log(f"cannot answer {question!r}: {exc}")
            return
        self.publish(result.text)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ros_args = argv[argv.index("--ros-args"):] if "--ros-args" in argv else []
    own = argv[: len(argv) - len(ros_args)]
    p = argparse.ArgumentParser(description="Answer std_msgs/String questions about a sensor_msgs/Image stream.")
    p.add_argument("dir", help="a tops-export output directory")
    p.add_argument("--image-topic", default="/camera/image_raw")
    p.add_argument("--query-topic", default="/vlm/query")
    p.add_argument("--answer-topic", default="/vlm/answer")
    p.add_argument("--keep", type=int, default=None, help="visual tokens to keep (default: the export's budget)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--backend", default="ort", choices=("ort", "trt"))
    args = p.parse_args(own)

    from tops_edge.runtime import Pipeline

    pipe = Pipeline.load(args.dir, backend=args.backend)  # before ROS: a bad export fails here, in one line
    try:
        import rclpy
        from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
        from rclpy.executors import MultiThreadedExecutor
        from rclpy.qos import qos_profile_sensor_data
        from sensor_msgs.msg import Image
        from std_msgs.msg import String
    except ImportError as exc:
        print(f"ros2_node: needs ROS 2 (rclpy, sensor_msgs, std_msgs): source your ROS 2 setup first ({exc})",
              file=sys.stderr)
        return 2

    rclpy.init(args=["ros2_node", *ros_args])
    node = rclpy.create_node("tops_vlm")
    answers = node.create_publisher(String, args.answer_topic, 10)
    bridge = VlmBridge(pipe, publish=lambda text: answers.publish(String(data=text)),
                       log=node.get_logger().warning, keep=args.keep, max_new_tokens=args.max_new_tokens)
    node.create_subscription(Image, args.image_topic, bridge.on_image, qos_profile_sensor_data,
                             callback_group=MutuallyExclusiveCallbackGroup())
    node.create_subscription(String, args.query_topic, bridge.on_query, 10,
                             callback_group=MutuallyExclusiveCallbackGroup())
    node.get_logger().info(f"answering {args.query_topic} about {args.image_topic} on {args.answer_topic}")
    executor = MultiThreadedExecutor(num_threads=2)
    executor.add_node(node)
    try:
        executor.spin()
    except KeyboardInterrupt:
        pass
    finally:
        executor.shutdown()
        node.destroy_node()
        if rclpy.ok():
            rclpy.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
